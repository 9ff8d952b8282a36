"""The CUDA kernels (csrc/cuda): what can be checked without a GPU, and everything else with one.

Without a GPU: the nvcc/g++ compile check (tools/check_cuda.sh), and the kernels' per-element
math (csrc/cuda/optimizer_math.cuh, the very functions the kernels call) built for the host and
compared with torch.optim. With a GPU and the built extension: parity with torch.optim (for-loop
and fused=True) for every option and dtype, awkward sizes and unaligned tensors, CUDA-graph
capture and replay, torch.compile, mixed devices, found_inf, tensor lr, many tensors and the
launch count. Tests that need a GPU skip with the reason.
"""

from __future__ import annotations

import copy
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_opt
from fused_opt import _ops, _torch_kernels

ROOT = Path(__file__).resolve().parents[1]


def _why_no_cuda_kernels() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if "cuda" not in fused_opt.available_backends():
        return f"needs the CUDA kernels (fused_opt._C_cuda: {_ops.LOAD_ERRORS.get('cuda')})"
    return None


_NO_CUDA = _why_no_cuda_kernels()
requires_cuda = pytest.mark.skipif(_NO_CUDA is not None, reason=_NO_CUDA or "")

SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "dampening_wd": {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
    "nesterov_maximize": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "maximize": True},
}
ADAM_CONFIGS = {
    "adam": ("Adam", {"lr": 1e-2}),
    "adam_l2_amsgrad": ("Adam", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    "adam_maximize": ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "maximize": True}),
    "adamw": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw_amsgrad_maximize": ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
}
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    # fp32 math rounded once: a couple of units in the last place of the stored value.
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
}


# ---- without a GPU: the compile check ---------------------------------------------------------
def _nvcc() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_sources_compile_for_sm80_and_sm90():
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "check_cuda.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("adam.cu ok", "sgd.cu ok", "ops_cuda.cpp ok"):
        assert name in result.stdout


# ---- without a GPU: the kernels' per-element math, built for the host ------------------------
@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to build the host math harness")
    library = tmp_path_factory.mktemp("harness") / "math_harness.so"
    source = ROOT / "csrc" / "cuda" / "testing" / "math_harness.cpp"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", str(source), "-o", str(library)],
        check=True,
    )
    lib = ctypes.CDLL(str(library))
    ptr, i64, f64, i32, f32 = (
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_float,
    )  # fmt: skip
    for suffix in ("f32", "f64"):
        getattr(lib, f"harness_sgd_{suffix}").argtypes = (
            [ptr] * 3 + [i64] + [f64] * 4 + [i32] * 4 + [f32]
        )
        getattr(lib, f"harness_adam_{suffix}").argtypes = (
            [ptr] * 5 + [i64] + [f64] * 6 + [i32] * 4 + [f32]
        )
    return lib


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _harness_sgd(lib, params, grads, bufs, step, cfg, grad_scale=None):
    fn = lib.harness_sgd_f64 if params[0].dtype == torch.float64 else lib.harness_sgd_f32
    for p, g, b in zip(params, grads, bufs, strict=True):
        fn(
            p.data_ptr(), g.data_ptr(), _address(b), p.numel(), cfg["lr"],
            cfg.get("weight_decay", 0.0), cfg.get("momentum", 0.0), cfg.get("dampening", 0.0),
            cfg.get("nesterov", False), cfg.get("maximize", False), step == 0,
            grad_scale is not None, grad_scale or 1.0,
        )  # fmt: skip


def _harness_adam(lib, params, grads, state, step, name, cfg, grad_scale=None):
    fn = lib.harness_adam_f64 if params[0].dtype == torch.float64 else lib.harness_adam_f32
    beta1, beta2 = cfg.get("betas", (0.9, 0.999))
    default_wd = 1e-2 if name == "AdamW" else 0.0
    for p, g, (m, v, vmax) in zip(params, grads, state, strict=True):
        fn(
            p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), _address(vmax), p.numel(),
            float(step + 1), cfg["lr"], beta1, beta2, cfg.get("weight_decay", default_wd),
            cfg.get("eps", 1e-8), cfg.get("amsgrad", False), cfg.get("maximize", False),
            name == "AdamW", grad_scale is not None, grad_scale or 1.0,
        )  # fmt: skip


def _leaf_params(dtype: torch.dtype, device="cpu", shapes=((5,), (3, 7), (1,)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for s in shapes
    ]


def _grad_sequence(params, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_host_built_sgd_math_matches_torch_optim(harness, config, dtype):
    cfg = SGD_CONFIGS[config]
    ref = _leaf_params(dtype)
    ours = [p.detach().clone() for p in ref]
    bufs = [torch.zeros_like(p) for p in ours] if cfg.get("momentum", 0) else [None] * len(ours)
    opt = torch.optim.SGD(ref, foreach=False, **cfg)
    for step, grads in enumerate(_grad_sequence(ref, 30)):
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        _harness_sgd(harness, ours, grads, bufs, step, cfg)
    for p, q in zip(ref, ours, strict=True):
        torch.testing.assert_close(q, p.detach(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_host_built_adam_math_matches_torch_optim(harness, config, dtype):
    name, cfg = ADAM_CONFIGS[config]
    ref = _leaf_params(dtype)
    ours = [p.detach().clone() for p in ref]
    amsgrad = cfg.get("amsgrad", False)
    state = [
        (torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p) if amsgrad else None)
        for p in ours
    ]
    opt = getattr(torch.optim, name)(ref, foreach=False, **cfg)
    for step, grads in enumerate(_grad_sequence(ref, 30)):
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        _harness_adam(harness, ours, grads, state, step, name, cfg)
    for p, q, (m, v, _) in zip(ref, ours, state, strict=True):
        torch.testing.assert_close(q, p.detach(), **TOLERANCE[dtype])
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], **TOLERANCE[dtype])
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], **TOLERANCE[dtype])


def test_host_built_math_unscales_grads(harness):
    # A power-of-two scale is exact, so the unscaled trajectory equals the unscaled reference.
    cfg = ADAM_CONFIGS["adam_l2_amsgrad"][1]
    plain, scaled = ([p.detach() for p in _leaf_params(torch.float32)] for _ in range(2))
    states = [
        [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
        for ps in (plain, scaled)
    ]
    for step, grads in enumerate(_grad_sequence(plain, 10)):
        _harness_adam(harness, plain, grads, states[0], step, "Adam", cfg)
        scaled_grads = [g * 1024 for g in grads]
        _harness_adam(harness, scaled, scaled_grads, states[1], step, "Adam", cfg, 1024.0)
    for p, q in zip(plain, scaled, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_host_built_adam_math_propagates_nan_and_inf_like_torch(harness, amsgrad):
    cfg = {"lr": 1e-2, "amsgrad": amsgrad, "weight_decay": 0.1}
    ref = [torch.randn(8, requires_grad=True)]
    ours = [ref[0].detach().clone()]
    state = [(torch.zeros(8), torch.zeros(8), torch.zeros(8) if amsgrad else None)]
    opt = torch.optim.Adam(ref, foreach=False, **cfg)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 2.0, 3.0, 4.0])
    for step in range(3):
        grads = [specials.roll(step) if step == 1 else torch.randn(8)]
        ref[0].grad = grads[0].clone()
        opt.step()
        _harness_adam(harness, ours, grads, state, step, "Adam", cfg)
        torch.testing.assert_close(
            ours[0], ref[0].detach(), equal_nan=True, **TOLERANCE[torch.float32]
        )
        if amsgrad:
            torch.testing.assert_close(
                state[0][2], opt.state[ref[0]]["max_exp_avg_sq"], equal_nan=True
            )


# ---- with a GPU --------------------------------------------------------------------------------
def _run_pair(make_fused, make_reference, params, steps: int, seed: int = 1):
    """Same grads into a fused_opt optimizer and a torch.optim one; returns both param lists."""
    ours = [p.detach().clone().requires_grad_() for p in params]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt, ref_opt = make_fused(ours), make_reference(ref)
    for grads in _grad_sequence(params, steps, seed):
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad = g.to(p.device)
            q.grad = g.to(q.device)
        opt.step()
        ref_opt.step()
    return ours, ref, opt, ref_opt


SHAPES = [(), (1,), (3,), (1023,), (65536 + 7,), (33, 65)]


@pytest.mark.parametrize("reference", ["for-loop", "fused"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
@pytest.mark.cuda
@requires_cuda
def test_adam_matches_torch_optim_on_cuda(config, dtype, reference):
    name, cfg = ADAM_CONFIGS[config]
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if reference == "for-loop" and low_precision:
        pytest.skip("torch's for-loop rounds after every op; fused=True is the fp32-math reference")
    params = _leaf_params(dtype, "cuda", SHAPES)
    flag = {"fused": True} if reference == "fused" else {"foreach": False}
    ours, ref, opt, ref_opt = _run_pair(
        lambda ps: getattr(fused_opt, name)(ps, backend="cuda", **cfg),
        lambda ps: getattr(torch.optim, name)(ps, **flag, **cfg),
        params,
        steps=20,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[dtype])
        torch.testing.assert_close(
            opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], **TOLERANCE[dtype]
        )
        assert opt.state[p]["step"].item() == 20


@pytest.mark.parametrize("reference", ["for-loop", "fused"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.cuda
@requires_cuda
def test_sgd_matches_torch_optim_on_cuda(config, dtype, reference):
    cfg = SGD_CONFIGS[config]
    if reference == "for-loop" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("torch's for-loop rounds after every op; fused=True is the fp32-math reference")
    flag = {"fused": True} if reference == "fused" else {"foreach": False}
    ours, ref, *_ = _run_pair(
        lambda ps: fused_opt.SGD(ps, backend="cuda", **cfg),
        lambda ps: torch.optim.SGD(ps, **flag, **cfg),
        _leaf_params(dtype, "cuda", SHAPES),
        steps=20,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[dtype])


def _unaligned(numel: int, dtype: torch.dtype, offset: int, seed: int) -> torch.Tensor:
    """A tensor whose data starts `offset` elements into its storage (not 16-byte aligned)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel + offset, generator=gen).to(device="cuda", dtype=dtype)
    return base[offset:]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.cuda
@requires_cuda
def test_op_matches_the_reference_kernel_for_ragged_sizes(aligned, amsgrad, dtype):
    # Sizes around the vector width and the 65536-element chunk; unaligned: each list of a
    # tensor starts at another element offset, so the scalar path runs the whole tensor.
    sizes = [1, 3, 17, 4097, 65536, 2 * 65536 + 5]
    offsets = [0, 0, 0] if aligned else [0, 1, 3]

    def lists(seed):
        return [
            [
                _unaligned(n, dtype, offsets[(i + k) % 3], seed + 10 * i + k)
                for i, n in enumerate(sizes)
            ]
            for k in range(5)
        ]

    ours, ref = lists(0), lists(0)
    for tensors in (ours[2], ours[3], ours[4], ref[2], ref[3], ref[4]):
        for t in tensors:
            t.abs_()  # valid second moments
    kwargs = dict(
        lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad,
        maximize=False, decoupled_weight_decay=True,
    )  # fmt: skip
    steps = [[torch.tensor(3.0) for _ in sizes] for _ in range(2)]
    p, g, m, v, vmax = ours
    torch.ops.fused_opt.adam_(p, g, m, v, vmax if amsgrad else [], steps[0], **kwargs)
    p, g, m, v, vmax = ref
    _torch_kernels.adam_(p, g, m, v, vmax if amsgrad else [], steps[1], **kwargs)
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    assert [s.item() for s in steps[0]] == [4.0] * len(sizes)


def _train_model(device, opt_factory, steps, capture: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
    opt = opt_factory(model.parameters())
    inputs = [
        (torch.randn(16, 32, device=device), torch.randn(16, 4, device=device))
        for _ in range(steps)
    ]
    if not capture:
        for x, y in inputs:
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.step()
        return model
    static_x, static_y = (t.clone() for t in inputs[0])
    warmup = 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in inputs[:warmup]:
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        F.mse_loss(model(static_x), static_y).backward()
        opt.step()
    for x, y in inputs[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    return model


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_capture_and_replay_of_a_training_step(name):
    cfg = {"SGD": {"lr": 0.05, "momentum": 0.9}}.get(name, {"lr": 1e-2, "capturable": True})

    def fused(ps):
        return getattr(fused_opt, name)(ps, backend="cuda", **cfg)

    def reference(ps):
        return getattr(torch.optim, name)(ps, **cfg)

    replayed = _train_model("cuda", fused, steps=10, capture=True)
    eager = _train_model("cuda", reference, steps=10, capture=False)
    for p, q in zip(replayed.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@requires_cuda
def test_torch_compile_fullgraph_step_on_cuda():
    torch._dynamo.reset()
    compiled_params = _leaf_params(torch.float32, "cuda", SHAPES)
    eager_params = [p.detach().clone().requires_grad_() for p in compiled_params]
    opts = [fused_opt.AdamW(ps, lr=1e-2, backend="cuda") for ps in (compiled_params, eager_params)]

    @torch.compile(fullgraph=True)
    def compiled_step():
        opts[0].step()

    for grads in _grad_sequence(compiled_params, 5):
        for p, q, g in zip(compiled_params, eager_params, grads, strict=True):
            p.grad, q.grad = g.cuda(), g.cuda()
        compiled_step()
        opts[1].step()
    for p, q in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])
    torch._dynamo.reset()


@pytest.mark.cuda
@requires_cuda
def test_mixed_cpu_and_cuda_params_in_one_optimizer():
    params = _leaf_params(torch.float32, "cpu", SHAPES[:3]) + _leaf_params(
        torch.float32, "cuda", SHAPES[3:]
    )
    ours, ref, opt, _ = _run_pair(
        lambda ps: fused_opt.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False),
        params,
        steps=10,
    )
    for p, q in zip(ours, ref, strict=True):
        assert p.device == q.device
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


@pytest.mark.cuda
@requires_cuda
def test_params_on_two_devices():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    params = _leaf_params(torch.float32, "cuda:0", SHAPES[:3]) + _leaf_params(
        torch.float32, "cuda:1", SHAPES[3:]
    )
    ours, ref, *_ = _run_pair(
        lambda ps: fused_opt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, backend="cuda"),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=False),
        params,
        steps=10,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.cuda
@requires_cuda
def test_found_inf_is_a_bitwise_no_op(capturable):
    n = 4
    p = [torch.randn(1000, device="cuda") for _ in range(n)]
    g, m, v, vmax = ([torch.rand(1000, device="cuda") for _ in range(n)] for _ in range(4))
    step_device = "cuda" if capturable else "cpu"
    steps = [torch.tensor(5.0, device=step_device) for _ in range(n)]
    before = copy.deepcopy([p, m, v, vmax, steps])
    kwargs = dict(
        lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False,
        decoupled_weight_decay=False, grad_scale=torch.tensor(2.0, device="cuda"),
        found_inf=torch.tensor(1.0, device="cuda"),
    )  # fmt: skip
    torch.ops.fused_opt.adam_(p, g, m, v, vmax, steps, **kwargs)
    bufs = [torch.rand(1000, device="cuda") for _ in range(n)]
    bufs_before = [b.clone() for b in bufs]
    torch.ops.fused_opt.sgd_(
        p, g, bufs, weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True,
        maximize=False, is_first_step=False, found_inf=kwargs["found_inf"],
    )  # fmt: skip
    torch.cuda.synchronize()
    for now, then in zip([p, m, v, vmax, steps, bufs], before + [bufs_before], strict=True):
        for a, b in zip(now, then, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("lr_device", ["cpu", "cuda"])
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.cuda
@requires_cuda
def test_tensor_lr_matches_float_lr(lr_dtype, lr_device):
    def run(lr):
        params = _leaf_params(torch.float32, "cuda", SHAPES)
        ours, *_ = _run_pair(
            lambda ps: fused_opt.AdamW(ps, lr=lr, backend="cuda", capturable=True),
            lambda ps: torch.optim.AdamW(ps, lr=1e-2),
            params,
            steps=5,
        )
        return ours

    lr = torch.tensor(1e-2, dtype=lr_dtype, device=lr_device)
    for p, q in zip(run(lr), run(1e-2), strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


@pytest.mark.cuda
@requires_cuda
def test_more_than_a_thousand_tensors_in_one_call():
    sizes = [1 + (i * 37) % 300 for i in range(1500)]
    params = _leaf_params(torch.float32, "cuda", [(s,) for s in sizes])
    ours, ref, *_ = _run_pair(
        lambda ps: fused_opt.Adam(ps, lr=1e-2, backend="cuda"),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        params,
        steps=3,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


def _kernel_launches(step, name_contains: str = "") -> int:
    """CUDA kernels launched by one call of ``step`` (after a first call that creates state)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and name_contains in e.name
    )


@pytest.mark.cuda
@requires_cuda
def test_launch_count_does_not_grow_with_the_number_of_tensors():
    capacity = _ops.native_module("cuda").MAX_TENSORS_PER_LAUNCH_ADAM
    assert capacity >= 300  # the 32 KB kernel-parameter space, not torch's 4 KB

    def launches(n, make, name_contains=""):
        params = _leaf_params(torch.float32, "cuda", [(64,)] * n)
        for p in params:
            p.grad = torch.randn_like(p)
        return _kernel_launches(make(params).step, name_contains)

    def ours(ps):
        return fused_opt.Adam(ps, lr=1e-3, backend="cuda")

    def torch_fused(ps):
        return torch.optim.Adam(ps, lr=1e-3, fused=True)

    ours_kernel = "multi_tensor_apply_kernel"
    assert launches(10, ours, ours_kernel) == launches(capacity, ours, ours_kernel) == 1
    assert launches(3 * capacity, ours, ours_kernel) == 3
    # Everything one step launches, ours against torch's fused Adam.
    assert launches(capacity, ours) < launches(capacity, torch_fused)


@pytest.mark.cuda
@requires_cuda
def test_invalid_inputs_raise_before_anything_changes():
    p = [torch.randn(10, device="cuda"), torch.randn(5, device="cuda")]
    before = [t.clone() for t in p]

    def sgd(grads, **overrides):
        kwargs = dict(
            weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
            maximize=False, is_first_step=True,
        )  # fmt: skip
        torch.ops.fused_opt.sgd_(p, grads, [], **{**kwargs, **overrides})

    bad_grads = {
        "shape": [torch.randn(10, device="cuda"), torch.randn(6, device="cuda")],
        "dtype": [
            torch.randn(10, device="cuda"),
            torch.randn(5, device="cuda", dtype=torch.float64),
        ],
        "device": [torch.randn(10, device="cuda"), torch.randn(5)],
        "sparse": [torch.randn(10, device="cuda"), torch.randn(5, device="cuda").to_sparse()],
        "length": [torch.randn(10, device="cuda")],
    }
    for grads in bad_grads.values():
        with pytest.raises(RuntimeError, match="fused_opt"):
            sgd(grads)
    good = [torch.randn(10, device="cuda"), torch.randn(5, device="cuda")]
    with pytest.raises(RuntimeError, match="found_inf"):
        sgd(good, found_inf=torch.tensor(0.0))  # on the CPU
    for a, b in zip(p, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
@requires_cuda
def test_capturing_a_step_with_host_step_counts_raises():
    p, g, m, v = ([torch.rand(100, device="cuda")] for _ in range(4))
    steps = [torch.tensor(0.0)]  # on the CPU: not capturable
    kwargs = dict(
        lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
        maximize=False, decoupled_weight_decay=False,
    )  # fmt: skip
    torch.ops.fused_opt.adam_(p, g, m, v, [], steps, **kwargs)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            torch.ops.fused_opt.adam_(p, g, m, v, [], steps, **kwargs)
    assert steps[0].item() == 1.0
