"""The CUDA kernels (csrc/cuda): what can be checked without a GPU, and everything else with one.

Without a GPU: the nvcc/g++ compile check (tools/check_cuda.sh), the glue's kernel signatures
against the op schemas, and the kernels' own code (packing, chunk lookup, vector and scalar paths,
math) run by a host emulation of the launches (csrc/cuda/testing/host_harness.cpp) and compared
with torch.optim and the pure-PyTorch kernels. With a GPU and the built extension: parity with
torch.optim (for-loop and fused=True) for every option and dtype, awkward sizes and unaligned
tensors, CUDA-graph capture and replay, torch.compile, mixed devices, found_inf, tensor lr, many
tensors and the launch count. Tests that need a GPU skip with the reason."""

from __future__ import annotations

import copy
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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
def test_cuda_sources_compile_for_every_default_arch():
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "check_cuda.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # the glue is checked against this torch
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("adam.cu ok", "sgd.cu ok", "ops_cuda.cpp ok"):
        assert name in result.stdout


# The C++ type each schema type reaches a stable-ABI kernel as (TORCH_BOX unboxes by position:
# a mismatch would read one type's bits as another's, so it must never compile).
_STABLE_TYPES = {
    "List[Tensor]": "std::vector<Tensor>",
    "Tensor": "Tensor",
    "Optional[Tensor]": "std::optional<Tensor>",
    "float": "double",
    "bool": "bool",
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_glue_signatures_match_the_op_schemas(tmp_path):
    """Each CUDA kernel registered with TORCH_BOX takes, position by position, the C++ types its
    op overload's schema passes: checked by static_asserts compiled against the glue's
    declarations (without CUDA the glue cannot load)."""
    glue = (ROOT / "csrc" / "cuda" / "ops_cuda.cpp").read_text()
    pattern = r"^void ((\w+_(?:float_lr|tensor_lr|tensor_hyper))\(.*?\)) \{"
    signatures = {name: signature for signature, name in re.findall(pattern, glue, re.M | re.S)}
    registered = re.findall(r'm\.impl\("([\w.]+)", TORCH_BOX\(&(\w+)\)\);', glue)
    expected = {
        f"{op}.{o}".replace(".default", "") for op in ("sgd_", "adam_") for o in _ops.OVERLOADS[op]
    }
    assert {name for name, _ in registered} == expected and len(signatures) == len(expected)
    checks = []
    for overload, function in registered:
        op, _, name = overload.partition(".")
        schema = getattr(getattr(torch.ops.fused_opt, op), name or "default")._schema
        types = ", ".join(_STABLE_TYPES[str(arg.type)] for arg in schema.arguments)
        checks.append(
            f"static_assert(std::is_same_v<Params<decltype({function})>::type, "
            f'std::tuple<{types}>>, "{function} does not take the arguments of '
            f'fused_opt::{overload}");'
        )
    source = "\n".join(
        [
            "#include <torch/csrc/stable/tensor.h>",
            "#include <optional>",
            "#include <tuple>",
            "#include <type_traits>",
            "#include <vector>",
            "using torch::stable::Tensor;",
            "using TensorList = const std::vector<Tensor>&;",
            "template <typename F> struct Params;",
            "template <typename R, typename... A> struct Params<R(A...)> {",
            "  using type = std::tuple<std::remove_cv_t<std::remove_reference_t<A>>...>;",
            "};",
        ]
        + [f"void {signature};" for signature in signatures.values()]
        + checks
    )
    check = tmp_path / "signatures.cpp"
    check.write_text(source)
    from torch.utils.cpp_extension import include_paths

    sys.path.insert(0, str(ROOT))
    try:
        import setup
    finally:
        sys.path.remove(str(ROOT))
    macros = [f"-D{k}={v}" for k, v in setup.stable_abi_macros()]
    includes = [f"-I{path}" for path in include_paths()]
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", *macros, *includes, str(check)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


# ---- without a GPU: the kernels' code, run by a host emulation of the launches ---------------
class HostLaunches:
    """ctypes front end of csrc/cuda/testing/host_harness.cpp.

    ``sgd()`` / ``adam()`` run launch_sgd / launch_adam on the host for fp32, fp64 and bf16: the
    kernels' own dtype grouping, table packing, chunk lookup, vector and scalar paths and math,
    every (block, thread) of every launch in turn. They return the number of launches.
    """

    DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        lib.harness_sgd.restype = lib.harness_adam.restype = i64
        lib.harness_sgd.argtypes = [i64] + [ptr] * 5 + [f64, ptr, i32] + [f64] * 3 + [i32] * 3
        lib.harness_sgd.argtypes += [ptr, ptr]
        hyper = [f64, ptr, i32]  # value, device pointer, pointer is fp64
        lib.harness_adam.argtypes = [i64] + [ptr] * 9 + [i32] + hyper * 4 + [f64]
        lib.harness_adam.argtypes += [i32] * 3 + [ptr, ptr]
        lib.harness_max_tensors_per_launch.argtypes = [i32, i32]

    def capacity(self, adam: bool, extra_list: bool) -> int:
        return self.lib.harness_max_tensors_per_launch(adam, extra_list)

    @staticmethod
    def _array(ctype, values) -> ctypes.Array:
        return (ctype * max(len(values), 1))(*values)

    def _pointers(self, tensors) -> ctypes.Array | None:
        return (
            None
            if tensors is None
            else self._array(ctypes.c_void_p, [t.data_ptr() for t in tensors])
        )

    def _common(self, params):
        dtypes = self._array(ctypes.c_int, [self.DTYPE_CODES[p.dtype] for p in params])
        numels = self._array(ctypes.c_int64, [p.numel() for p in params])
        return dtypes, numels

    @staticmethod
    def _hyper(value):
        """A float, or a tensor whose memory the kernels read as a device scalar."""
        if isinstance(value, torch.Tensor):
            return 0.0, value.data_ptr(), int(value.dtype == torch.float64)
        return float(value), None, 0

    @staticmethod
    def _scalar(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    def sgd(self, params, grads, bufs, *, lr, weight_decay=0.0, momentum=0.0, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=False, grad_scale=None,
            found_inf=None) -> int:  # fmt: skip
        dtypes, numels = self._common(params)
        lists = [self._pointers(t) for t in (params, grads, bufs if momentum else None)]
        return self.lib.harness_sgd(
            len(params), dtypes, numels, *lists, *self._hyper(lr), weight_decay, momentum,
            dampening, nesterov, maximize, is_first_step, self._scalar(grad_scale),
            self._scalar(found_inf),
        )  # fmt: skip

    def adam(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, lr, new_steps=None,
             step_tensors=None, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
             amsgrad=False, maximize=False, decoupled=False, grad_scale=None,
             found_inf=None) -> int:  # fmt: skip
        dtypes, numels = self._common(params)
        lists = [self._pointers(t) for t in (params, grads, exp_avgs, exp_avg_sqs)]
        lists.append(self._pointers(max_exp_avg_sqs) if amsgrad else None)
        steps = None if new_steps is None else self._array(ctypes.c_double, new_steps)
        counters = self._pointers(step_tensors)
        double_steps = int(step_tensors is not None and step_tensors[0].dtype == torch.float64)
        hyper = [x for value in (lr, beta1, beta2, weight_decay) for x in self._hyper(value)]
        return self.lib.harness_adam(
            len(params), dtypes, numels, *lists, steps, counters, double_steps, *hyper, eps,
            amsgrad, maximize, decoupled, self._scalar(grad_scale), self._scalar(found_inf),
        )  # fmt: skip


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostLaunches:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to build the host harness")
    library = tmp_path_factory.mktemp("harness") / "host_harness.so"
    source = ROOT / "csrc" / "cuda" / "testing" / "host_harness.cpp"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", str(source), "-o", str(library)],
        check=True,
    )
    return HostLaunches(ctypes.CDLL(str(library)))


def _leaf_params(dtype: torch.dtype, device="cpu", shapes=((5,), (3, 7), (1,)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for s in shapes
    ]


def _grad_sequence(params, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(steps)]


HOST_SHAPES = ((), (5,), (3, 7), (1023,), (4097,))


def _adam_options(name: str, cfg: dict) -> dict:
    beta1, beta2 = cfg.get("betas", (0.9, 0.999))
    return dict(
        lr=cfg["lr"], beta1=beta1, beta2=beta2,
        weight_decay=cfg.get("weight_decay", 1e-2 if name == "AdamW" else 0.0),
        eps=cfg.get("eps", 1e-8), amsgrad=cfg.get("amsgrad", False),
        maximize=cfg.get("maximize", False), decoupled=name == "AdamW",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_host_emulated_sgd_matches_torch_optim(host, config, dtype):
    cfg = SGD_CONFIGS[config]
    ref = _leaf_params(dtype, shapes=HOST_SHAPES)
    ours = [p.detach().clone() for p in ref]
    bufs = [torch.zeros_like(p) for p in ours]
    opt = torch.optim.SGD(ref, foreach=False, **cfg)
    for step, grads in enumerate(_grad_sequence(ref, 30)):
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        assert host.sgd(ours, grads, bufs, is_first_step=step == 0, **cfg) == 1
    for p, q in zip(ref, ours, strict=True):
        torch.testing.assert_close(q, p.detach(), **TOLERANCE[dtype])


@pytest.mark.parametrize("steps_on_device", [False, True], ids=["host-steps", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_host_emulated_adam_matches_torch_optim(host, config, dtype, steps_on_device):
    name, cfg = ADAM_CONFIGS[config]
    ref = _leaf_params(dtype, shapes=HOST_SHAPES)
    ours = [p.detach().clone() for p in ref]
    m, v, vmax = ([torch.zeros_like(p) for p in ours] for _ in range(3))
    counters = [torch.tensor(0.0) for _ in ours]
    opt = getattr(torch.optim, name)(ref, foreach=False, **cfg)
    for step, grads in enumerate(_grad_sequence(ref, 30)):
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        if steps_on_device:  # the kernels read the counters; then launch_increment_steps
            host.adam(ours, grads, m, v, vmax, step_tensors=counters, **_adam_options(name, cfg))
            torch._foreach_add_(counters, 1)
        else:
            steps = [float(step + 1)] * len(ours)
            host.adam(ours, grads, m, v, vmax, new_steps=steps, **_adam_options(name, cfg))
    for i, p in enumerate(ref):
        torch.testing.assert_close(ours[i], p.detach(), **TOLERANCE[dtype])
        torch.testing.assert_close(m[i], opt.state[p]["exp_avg"], **TOLERANCE[dtype])
        torch.testing.assert_close(v[i], opt.state[p]["exp_avg_sq"], **TOLERANCE[dtype])
        if cfg.get("amsgrad"):
            torch.testing.assert_close(vmax[i], opt.state[p]["max_exp_avg_sq"], **TOLERANCE[dtype])


def test_host_emulated_adam_unscales_grads(host):
    # A power-of-two scale is exact, so the scaled run must equal the unscaled one bit for bit.
    options = _adam_options(*ADAM_CONFIGS["adam_l2_amsgrad"])
    runs = []
    for scale in (None, 1024.0):
        params = [p.detach() for p in _leaf_params(torch.float32, shapes=HOST_SHAPES)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        scale_tensor = None if scale is None else torch.tensor(scale)
        for step, grads in enumerate(_grad_sequence(params, 10)):
            grads = grads if scale is None else [g * scale for g in grads]
            steps = [float(step + 1)] * len(params)
            host.adam(params, grads, *state, new_steps=steps, grad_scale=scale_tensor, **options)
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_host_emulated_adam_propagates_nan_and_inf_like_torch(host, amsgrad):
    cfg = {"lr": 1e-2, "amsgrad": amsgrad, "weight_decay": 0.1}
    ref = [torch.randn(8, requires_grad=True)]
    ours = [ref[0].detach().clone()]
    m, v, vmax = ([torch.zeros(8)] for _ in range(3))
    opt = torch.optim.Adam(ref, foreach=False, **cfg)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 2.0, 3.0, 4.0])
    for step in range(3):
        grads = [specials.roll(step) if step == 1 else torch.randn(8)]
        ref[0].grad = grads[0].clone()
        opt.step()
        host.adam(ours, grads, m, v, vmax, new_steps=[step + 1.0], **_adam_options("Adam", cfg))
        torch.testing.assert_close(
            ours[0], ref[0].detach(), equal_nan=True, **TOLERANCE[torch.float32]
        )
        if amsgrad:
            expected = opt.state[ref[0]]["max_exp_avg_sq"]
            torch.testing.assert_close(vmax[0], expected, equal_nan=True)


def _offset_tensor(numel: int, dtype: torch.dtype, offset: int, seed: int) -> torch.Tensor:
    """`numel` values starting `offset` elements into their storage (unaligned when offset > 0)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel + offset, generator=gen).to(dtype)[offset:]


RAGGED_SIZES = [1, 3, 17, 4097, 65536, 2 * 65536 + 5]


def _ragged_lists(dtype, aligned: bool, lists: int, seed: int = 0):
    # Unaligned: each list of a tensor starts at another element offset.
    offsets = [0, 0, 0] if aligned else [0, 1, 3]
    return [
        [
            _offset_tensor(n, dtype, offsets[(i + k) % 3], seed + 10 * i + k)
            for i, n in enumerate(RAGGED_SIZES)
        ]
        for k in range(lists)
    ]


HOST_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", HOST_DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_host_emulated_adam_matches_the_reference_kernel_on_ragged_sizes(
    host, aligned, amsgrad, dtype
):
    ours, ref = _ragged_lists(dtype, aligned, 5), _ragged_lists(dtype, aligned, 5)
    for tensors in ours[2:] + ref[2:]:
        for t in tensors:
            t.abs_()  # valid second moments
    options = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad)
    launches = host.adam(
        *ours, new_steps=[4.0] * len(RAGGED_SIZES), decoupled=True, maximize=True, **options
    )
    assert launches == 1
    steps = [torch.tensor(3.0) for _ in RAGGED_SIZES]
    p, g, m, v, vmax = ref
    _torch_kernels.adam_(
        p, g, m, v, vmax if amsgrad else [], steps, decoupled_weight_decay=True, maximize=True,
        **options,
    )  # fmt: skip
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HOST_DTYPES, ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_host_emulated_sgd_matches_the_reference_kernel_on_ragged_sizes(host, aligned, dtype):
    ours, ref = _ragged_lists(dtype, aligned, 3), _ragged_lists(dtype, aligned, 3)
    options = dict(lr=0.1, weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True)
    assert host.sgd(*ours, is_first_step=False, **options) == 1
    _torch_kernels.sgd_(*ref, maximize=False, is_first_step=False, **options)
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE[dtype])


def test_host_emulated_launch_count_depends_on_tensor_count_only(host):
    adam_capacity = host.capacity(adam=True, extra_list=False)
    sgd_capacity = host.capacity(adam=False, extra_list=True)
    assert adam_capacity >= 500 and sgd_capacity >= 800  # torch's fused Adam: 36

    def adam_launches(shapes, dtypes=(torch.float32,)):
        params = [torch.zeros(s, dtype=dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(4)]
        return host.adam(params, *state, lr=1e-3, new_steps=[1.0] * len(params))

    def sgd_launches(n):
        params = [torch.zeros(4) for _ in range(n)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        return host.sgd(params, *state, lr=0.1, momentum=0.9)

    assert adam_launches([(8,)] * 10) == 1
    assert adam_launches([(8,)] * adam_capacity) == 1
    assert adam_launches([(8,)] * (adam_capacity + 1)) == 2
    assert adam_launches([(8,)] * (3 * adam_capacity)) == 3
    assert adam_launches([(300_000,)] * 4) == 1  # sizes do not matter: 20 chunks, one launch
    assert adam_launches([(0,)] * 5) == 0  # nothing to do
    mixed = (torch.float32, torch.float64, torch.bfloat16)
    assert adam_launches([(8,)] * 10, dtypes=mixed) == 3  # one group per dtype
    assert sgd_launches(sgd_capacity + 1) == 2


def test_host_emulated_found_inf_changes_nothing(host):
    params = [p.detach() for p in _leaf_params(torch.float32, shapes=HOST_SHAPES)]
    grads = _grad_sequence(params, 1)[0]
    state = [[torch.rand_like(p) for p in params] for _ in range(3)]
    before = copy.deepcopy([params, *state])
    found_inf = torch.tensor(1.0)
    host.adam(params, grads, *state, lr=1e-2, amsgrad=True, new_steps=[2.0] * len(params),
              weight_decay=0.1, found_inf=found_inf)  # fmt: skip
    host.sgd(params, grads, state[0], lr=0.1, momentum=0.9, found_inf=found_inf)
    for now, then in zip([params, *state], before, strict=True):
        for a, b in zip(now, then, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_host_emulated_tensor_lr_equals_float_lr(host, lr_dtype):
    lr = torch.tensor(1e-2, dtype=lr_dtype)
    runs = []
    for rate in (lr.item(), lr):
        params = [p.detach() for p in _leaf_params(torch.float32, shapes=HOST_SHAPES)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        for step, grads in enumerate(_grad_sequence(params, 5)):
            host.adam(params, grads, *state, lr=rate, weight_decay=0.1, decoupled=True,
                      new_steps=[step + 1.0] * len(params))  # fmt: skip
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_host_emulated_device_betas_and_weight_decay_equal_floats(host, dtype):
    """The tensor_hyper path: lr, betas and weight decay read from memory by every block."""
    tensors = {k: torch.tensor(v, dtype=dtype) for k, v in
               dict(lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1).items()}  # fmt: skip
    runs = []
    for hyper in ({k: t.item() for k, t in tensors.items()}, tensors):
        params = [p.detach() for p in _leaf_params(torch.float32, shapes=HOST_SHAPES)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        counters = [torch.zeros(()) for _ in params]
        for grads in _grad_sequence(params, 5):
            host.adam(params, grads, *state, **hyper, amsgrad=True, decoupled=True,
                      step_tensors=counters)  # fmt: skip
            torch._foreach_add_(counters, 1)  # launch_increment_steps' part
        runs.append(params + [t for ts in state for t in ts])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    # Device betas without device steps: the host has no betas for the bias corrections.
    params = [p.detach() for p in _leaf_params(torch.float32, shapes=HOST_SHAPES)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    before = [t.clone() for t in params]
    launches = host.adam(params, [torch.ones_like(p) for p in params], *state, lr=1e-2,
                         beta1=torch.tensor(0.9), new_steps=[1.0] * len(params))  # fmt: skip
    assert launches == -1
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_device_betas_and_weight_decay_reach_the_kernel_unread(name):
    """Tensors on a device other than the CPU go to adam_.tensor_hyper as they are: the meta
    device stands in for a GPU here, where any host read (float(), .item()) would raise."""
    params = [nn.Parameter(torch.zeros(3, device="meta")) for _ in range(2)]
    for p in params:
        p.grad = torch.zeros(3, device="meta")
    opt = getattr(fused_opt, name)(params, capturable=True)
    lr, beta1, beta2, weight_decay = (
        torch.tensor(v, device="meta") for v in (1e-2, 0.9, 0.99, 0.1)
    )
    # Set after construction: torch.optim's constructor compares them with numbers.
    opt.param_groups[0].update(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)

    class Calls(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append((str(func), kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Calls() as calls:
        opt.step()
        opt.step()
    steps = [kwargs for func, kwargs in calls.seen if func.startswith("fused_opt.adam_")]
    assert [func for func, _ in calls.seen if func.startswith("fused_opt.")] == [
        "fused_opt.adam_.tensor_hyper"
    ] * 2
    for kwargs in steps:
        assert kwargs["beta1"] is beta1 and kwargs["beta2"] is beta2
        assert kwargs["weight_decay"] is weight_decay and kwargs["lr"] is lr


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


@pytest.mark.cuda
@requires_cuda
def test_grads_laid_out_unlike_their_param_are_read_through_a_copy():
    def inputs():
        torch.manual_seed(0)
        params = [torch.randn(16, 8, device="cuda").t(), torch.randn(8, 16, device="cuda")]
        grads = [
            torch.randn(8, 16, device="cuda"),  # contiguous, its param is transposed
            torch.randn(8, 32, device="cuda")[:, ::2],  # not dense at all
        ]
        return params, grads, [torch.rand_like(p) for p in params]

    options = dict(
        weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True, maximize=False,
        is_first_step=False,
    )  # fmt: skip
    ours, ref = inputs(), inputs()
    torch.ops.fused_opt.sgd_(*ours, **options)
    _torch_kernels.sgd_(*ref, **options)
    for mine, theirs in zip(ours, ref, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


# ---- without a GPU: how the CUDA backend is found and refused ---------------------------------
def test_import_and_a_cpu_step_ask_cuda_nothing():
    # torch.cuda.is_available() initialises the driver: a process forked after it (a DataLoader
    # worker) cannot use CUDA. Importing fused_opt and stepping CPU params must not ask.
    code = """
import torch
calls = []
def spy(name, real):
    def call(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return call
for name in ("is_available", "device_count", "init", "current_device"):
    setattr(torch.cuda, name, spy(name, getattr(torch.cuda, name)))
import fused_opt
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
for cls in (fused_opt.SGD, fused_opt.AdamW):
    cls([p], lr=0.1).step()
print(calls)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


class _FakeCudaModule:
    """fused_opt._C_cuda as _ops sees it, on GPUs that are not there ("raise": the runtime
    could not tell)."""

    def __init__(self, problems: dict[int, str | None]) -> None:
        self.problems = problems
        self.asked: list[int] = []

    def kernel_image_problem(self, index: int) -> str | None:
        self.asked.append(index)
        if self.problems[index] == "raise":
            raise RuntimeError("CUDA error while probing: out of memory")
        return self.problems[index]


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend GPUs: each index maps to the binary's problem there (None: it runs). The ones
    with a problem are sm_121, the others sm_90; the build holds 9.0+PTX."""

    def install(problems: dict[int, str | None]) -> None:
        monkeypatch.setattr(_ops, "_cuda_module", _FakeCudaModule(problems))
        monkeypatch.setattr(
            _ops, "COMPILED", {k: v for k, v in _ops.COMPILED.items() if k != "cuda"}
        )
        monkeypatch.setattr(_ops, "LOAD_ERRORS", {})
        monkeypatch.setattr(_ops, "_DEVICE_PROBLEMS", {})
        info = {**_ops.BUILD_INFO, "extensions": True, "cuda_version": "13.0",
                "cuda_archs": ["9.0+PTX"]}  # fmt: skip
        monkeypatch.setattr(_ops, "BUILD_INFO", info)
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(problems))
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")
        monkeypatch.setattr(cuda, "get_device_capability",
                            lambda i=None: (12, 1) if problems[i] else (9, 0))  # fmt: skip

    return install


def test_a_gpu_the_binary_has_no_code_for_runs_the_torch_backend_after_one_warning(fake_gpus):
    import warnings

    from fused_opt import __main__, _backends, functional

    no_image = "no kernel image is available for execution on the device"
    fake_gpus({0: no_image, 1: None})
    with pytest.warns(_ops.FallbackWarning, match=r"cuda:0 \(Fake GPU 0, sm_121; built for 9\.0"):
        assert _backends.resolve("auto", torch.device("cuda:0")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per device, not per step
        assert _backends.resolve("auto", torch.device("cuda:0")) == "torch"
        assert _backends.resolve("auto", torch.device("cuda:1")) == "cuda"
        assert _backends.resolve("cuda", torch.device("cuda:1")) == "cuda"
    with pytest.raises(RuntimeError, match=f"cannot run on cuda:0: .*{no_image}"):
        _backends.resolve("cuda", torch.device("cuda:0"))
    assert "cuda" in fused_opt.available_backends()
    # The dispatcher would send cuda:0's tensors to the CUDA kernel: the torch backend's
    # kernel is called directly instead.
    assert functional.kernel("adam_", "torch", torch.device("cuda:0"), "default") is (
        _torch_kernels.adam_
    )
    # python -m fused_opt fails the node, naming the device.
    (problem,) = [p for p in __main__.unusable_builds() if p.startswith("cuda:")]
    assert problem.startswith("cuda:0: ") and "sm_121" in problem


def test_a_probe_the_runtime_cannot_answer_is_asked_again(fake_gpus):
    import warnings

    from fused_opt import _backends

    fake_gpus({0: "raise"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no arch warning: nothing is known of the arch
        assert _backends.resolve("auto", torch.device("cuda:0")) == "cuda"
        assert _backends.resolve("auto", torch.device("cuda:0")) == "cuda"
    assert _ops._cuda_module.asked == [0, 0]


def test_cuda_kernels_built_but_no_gpu_is_no_error(fake_gpus, monkeypatch):
    from fused_opt import __main__, _backends

    fake_gpus({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in fused_opt.available_backends()
    assert _ops.LOAD_ERRORS["cuda"] == "no CUDA device is available"
    assert _backends.resolve("auto", torch.device("cpu")) in ("cpp", "torch")
    assert not [p for p in __main__.unusable_builds() if "CUDA" in p or p.startswith("cuda:")]


# ---- with a GPU: what the first GPU must confirm ----------------------------------------------
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
@pytest.mark.cuda
@requires_cuda
def test_a_capturable_step_makes_no_host_sync(name):
    cfg = {"SGD": {"lr": 0.05, "momentum": 0.9}}.get(name, {"lr": 1e-2, "capturable": True})
    params = _leaf_params(torch.float32, "cuda", SHAPES)
    opt = getattr(fused_opt, name)(params, backend="cuda", **cfg)
    grads = [[g.cuda() for g in gs] for gs in _grad_sequence(params, 4)]  # copied before
    for p, g in zip(params, grads[0], strict=True):
        p.grad = g.clone()
    opt.step()  # the first step creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads[1:]:
            for p, g in zip(params, step_grads, strict=True):
                p.grad.copy_(g)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@requires_cuda
def test_an_lr_tensor_changed_between_graph_replays_is_read_at_each_replay():
    lrs = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4]
    params = _leaf_params(torch.float32, "cuda", SHAPES)
    ours = [p.detach().clone().requires_grad_() for p in params]
    ref = [p.detach().clone().requires_grad_() for p in params]
    lr = torch.tensor(lrs[0], device="cuda")
    opt = fused_opt.AdamW(ours, lr=lr, capturable=True, backend="cuda")
    ref_opt = torch.optim.AdamW(ref, lr=lrs[0])
    grads = _grad_sequence(params, len(lrs))
    for p, g in zip(ours, grads[0], strict=True):
        p.grad = g.cuda().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up (state created), then the captured step
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    # Capturing runs nothing: the warm-up was step 1, the replays are steps 2, 3, ...
    for q, g in zip(ref, grads[0], strict=True):
        q.grad = g.cuda().clone()
    ref_opt.step()
    for step_lr, step_grads in zip(lrs[1:], grads[1:], strict=True):
        lr.fill_(step_lr)
        for p, q, g in zip(ours, ref, step_grads, strict=True):
            p.grad.copy_(g.cuda())
            q.grad = g.cuda().clone()
        graph.replay()
        ref_opt.param_groups[0]["lr"] = step_lr
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.cuda
@requires_cuda
def test_device_betas_and_weight_decay_change_between_graph_replays(name, amsgrad):
    """Betas and weight decay as CUDA tensors: read by the kernels at each replay (no host
    read, no sync), along the trajectory of torch.optim given the same values as floats."""
    schedule = [(0.9, 0.999, 0.1), (0.8, 0.99, 0.05), (0.7, 0.9, 0.0), (0.85, 0.95, 0.2)]
    params = _leaf_params(torch.float32, "cuda", SHAPES)
    ours = [p.detach().clone().requires_grad_() for p in params]
    ref = [p.detach().clone().requires_grad_() for p in params]
    beta1, beta2, weight_decay = (torch.tensor(v, device="cuda") for v in schedule[0])
    opt = getattr(fused_opt, name)(
        ours,
        lr=1e-2,
        betas=(beta1, beta2),
        amsgrad=amsgrad,
        weight_decay=weight_decay,
        capturable=True,
        backend="cuda",
    )
    ref_opt = getattr(torch.optim, name)(ref, lr=1e-2, amsgrad=amsgrad)
    grads = _grad_sequence(params, 2 * len(schedule))

    def set_values(values, step_grads) -> None:
        for t, v in zip((beta1, beta2, weight_decay), values, strict=True):
            t.fill_(v)
        # torch.optim gets the fp32 values the kernels read.
        b1, b2, wd = (torch.tensor(v, dtype=torch.float32).item() for v in values)
        ref_opt.param_groups[0].update(betas=(b1, b2), weight_decay=wd)
        for p, q, g in zip(ours, ref, step_grads, strict=True):
            p.grad = g.cuda().clone() if p.grad is None else p.grad.copy_(g.cuda())
            q.grad = g.cuda().clone()

    set_values(schedule[0], grads[0])
    opt.step()  # the first step creates the state
    ref_opt.step()
    set_values(schedule[1], grads[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()  # eager, and no sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # capturing runs nothing: the replays are steps 3, 4, ...
    for values, step_grads in zip(schedule * 2, grads[2:], strict=False):
        set_values(values, step_grads)
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key],
                                       **TOLERANCE[torch.float32])  # fmt: skip
    assert opt.state[ours[0]]["step"].item() == ref_opt.state[ref[0]]["step"].item()


@pytest.mark.cuda
@requires_cuda
def test_device_betas_with_host_step_counts_raise_before_anything_changes():
    params = [torch.randn(5, device="cuda")]
    lists = [params, [torch.ones(5, device="cuda")], [torch.zeros(5, device="cuda")],
             [torch.zeros(5, device="cuda")], [], [torch.tensor(0.0)]]  # fmt: skip
    before = copy.deepcopy(lists)
    beta = torch.tensor(0.9, device="cuda")
    with pytest.raises(RuntimeError, match="betas on cuda:0 need the steps there too"):
        torch.ops.fused_opt.adam_.tensor_hyper(
            *lists, lr=torch.tensor(1e-2), beta1=beta, beta2=beta,
            weight_decay=torch.tensor(0.0), eps=1e-8, amsgrad=False, maximize=False,
            decoupled_weight_decay=False,
        )  # fmt: skip
    for now, then in zip(lists, before, strict=True):
        for a, b in zip(now, then, strict=True):
            assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("op", ["sgd_", "adam_"])
@pytest.mark.cuda
@requires_cuda
def test_one_call_over_several_dtypes_matches_a_call_per_dtype(op):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bfloat16]
    gen = torch.Generator().manual_seed(0)

    def lists():
        params = [torch.randn(1000 + 7 * i, generator=gen).to("cuda", dt) for i, dt in
                  enumerate(dtypes)]  # fmt: skip
        grads = [torch.randn(p.shape, generator=gen).to("cuda", p.dtype) for p in params]
        return params, grads

    params, grads = lists()
    if op == "sgd_":
        state = [[torch.randn(p.shape, generator=gen).to("cuda", p.dtype) for p in params]]
        hyper = dict(weight_decay=0.01, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True,
                     maximize=False, is_first_step=False)  # fmt: skip
    else:
        state = [[torch.randn(p.shape, generator=gen).to("cuda", p.dtype) for p in params],
                 [torch.rand(p.shape, generator=gen).to("cuda", p.dtype) for p in params],
                 [], [torch.tensor(3.0) for _ in params]]  # fmt: skip
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
                     maximize=False, decoupled_weight_decay=True)  # fmt: skip
    one = copy.deepcopy([params, grads, *state])
    getattr(torch.ops.fused_opt, op)(*one, **hyper)
    by_dtype = copy.deepcopy([params, grads, *state])
    for dt in dict.fromkeys(dtypes):
        pick = [i for i, d in enumerate(dtypes) if d == dt]
        lists_of_dt = [[ts[i] for i in pick] if ts else [] for ts in by_dtype]
        getattr(torch.ops.fused_opt, op)(*lists_of_dt, **hyper)
    for a_list, b_list in zip(one, by_dtype, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            assert torch.equal(a, b)


@pytest.mark.cuda
@requires_cuda
def test_a_step_on_a_side_stream_matches_the_default_stream():
    def run(stream):
        params = _leaf_params(torch.float32, "cuda", SHAPES)
        opt = fused_opt.Adam(params, lr=1e-2, amsgrad=True, backend="cuda")
        for grads in _grad_sequence(params, 3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.cuda()
            if stream is None:
                opt.step()
            else:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    opt.step()
                torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        return params

    for p, q in zip(run(torch.cuda.Stream()), run(None), strict=True):
        assert torch.equal(p, q)


@pytest.mark.cuda
@requires_cuda
def test_an_lr_tensor_on_another_gpu_steps_every_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    params = _leaf_params(torch.float32, "cuda:0", SHAPES[:3]) + _leaf_params(
        torch.float32, "cuda:1", SHAPES[3:]
    )
    for name in ("SGD", "Adam"):
        cfg = {"lr": torch.tensor(0.05, device="cuda:1")}
        ours, ref, *_ = _run_pair(
            lambda ps, name=name, cfg=cfg: getattr(fused_opt, name)(ps, backend="cuda", **cfg),
            lambda ps, name=name: getattr(torch.optim, name)(ps, lr=0.05, foreach=False),
            params,
            steps=3,
        )
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", ["Adam", "SGD"])
@pytest.mark.cuda
@requires_cuda
def test_more_tensors_than_one_launch_of_step_counters_holds(name):
    # Capturable Adam increments its device step counters about 4000 a launch; amsgrad carries
    # the most lists per tensor.
    cfg = {"Adam": {"lr": 1e-2, "amsgrad": True, "capturable": True},
           "SGD": {"lr": 0.05, "momentum": 0.9}}[name]  # fmt: skip
    params = _leaf_params(torch.float32, "cuda", [(1 + i % 7,) for i in range(5000)])
    ours, ref, opt, ref_opt = _run_pair(
        lambda ps: getattr(fused_opt, name)(ps, backend="cuda", **cfg),
        lambda ps: getattr(torch.optim, name)(ps, foreach=False, **cfg),
        params,
        steps=3,
    )
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])
    if name == "Adam":
        assert all(opt.state[p]["step"].item() == 3 for p in ours)


@pytest.mark.slow
@pytest.mark.cuda
@requires_cuda
def test_a_bf16_tensor_of_more_than_2_31_elements():
    # 64-bit indexing: 3 x 4.3 GB (param, grad, momentum). Each slice of the result must be what
    # torch.optim makes of that slice stepped alone.
    numel = 2**31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    p = torch.empty(numel, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    g = torch.empty_like(p).uniform_(-1, 1)
    buf = torch.empty_like(p).uniform_(-1, 1)
    windows = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(numel - 4096, numel)]
    refs = [p[w].float().clone().requires_grad_() for w in windows]
    ref_opt = torch.optim.SGD(refs, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
    for q, w in zip(refs, windows, strict=True):
        q.grad = g[w].float()
        ref_opt.state[q]["momentum_buffer"] = buf[w].float().clone()
    torch.ops.fused_opt.sgd_([p], [g], [buf], weight_decay=0.01, momentum=0.9, lr=0.1,
                             dampening=0.0, nesterov=False, maximize=False,
                             is_first_step=False)  # fmt: skip
    ref_opt.step()
    for q, w in zip(refs, windows, strict=True):
        torch.testing.assert_close(p[w].float(), q.detach(), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.cuda
@requires_cuda
def test_a_default_adam_step_under_grad_scaler_makes_no_host_sync(name):
    # Not capturable: the step counts live on the GPU all the same (as torch's fused Adam
    # keeps them), so found_inf is never read on the host.
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).cuda()
    opt = getattr(fused_opt, name)(model.parameters(), lr=1e-2, backend="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    batches = [(torch.randn(8, 16, device="cuda"), torch.randn(8, 1, device="cuda"))
               for _ in range(4)]  # fmt: skip

    def step(x, y):
        opt.zero_grad(set_to_none=False)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()

    step(*batches[0])  # creates the state
    assert all(s["step"].device.type == "cuda" for s in opt.state.values())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    reference = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
    loaded = reference(model.parameters(), lr=1e-2)
    loaded.load_state_dict(opt.state_dict())  # a checkpoint torch.optim takes as it is
    assert all(s["step"].item() == 4 for s in loaded.state.values())
