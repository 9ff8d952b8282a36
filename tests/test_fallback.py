"""Without the compiled kernels fused_opt imports, warns once and trains on the torch backend."""

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_OPT_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=full_env, timeout=300,
    )  # fmt: skip


TRAIN_AND_COMPARE = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, fused_opt
    fallback = [w for w in caught if issubclass(w.category, fused_opt._ops.FallbackWarning)]
    print("warnings:", len(fallback))
    for w in fallback:
        print("message:", w.message)
    print("available:", fused_opt.available_backends())
    try:
        fused_opt.Adam([torch.zeros(3, requires_grad=True)], backend="cpp")
    except RuntimeError as e:
        print("cpp:", e)
    a = torch.randn(10, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ours, theirs = fused_opt.AdamW([a], lr=0.1), torch.optim.AdamW([b], lr=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(); theirs.step()
    # torch.optim within float rounding (the fallback may run torch's fused kernel)
    print("backend:", ours.backend, "matches:", torch.allclose(a, b, rtol=1e-6, atol=1e-7))
"""


def test_missing_kernels_warn_once_and_the_torch_backend_runs():
    out = run_python(TRAIN_AND_COMPARE, FUSED_OPT_DISABLE_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout  # the remedy
    assert "FUSED_OPT_BACKEND=torch" in out.stdout
    assert "available: ['torch']" in out.stdout
    assert "cpp: fused_opt backend 'cpp' is not available" in out.stdout
    assert "backend: torch matches: True" in out.stdout


def test_choosing_the_torch_backend_silences_the_warning():
    out = run_python(TRAIN_AND_COMPARE, FUSED_OPT_DISABLE_NATIVE="1", FUSED_OPT_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert "warnings: 0" in out.stdout
    assert "backend: torch matches: True" in out.stdout


BREAK_THE_LIBRARY = """
    import sys, importlib.abc
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fused_opt._C":
                raise ImportError("undefined symbol: _ZN3c106detail")
    sys.meta_path.insert(0, Broken())
"""


def test_a_library_that_fails_to_load_is_reported_not_raised():
    """A broken binary (here: one that raises on import) must not break `import fused_opt`."""
    code = textwrap.dedent(BREAK_THE_LIBRARY) + textwrap.dedent(TRAIN_AND_COMPARE)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout
    assert "undefined symbol" in out.stdout
    assert "backend: torch matches: True" in out.stdout


@pytest.mark.parametrize("value", ["cuda", "nonsense"])
def test_env_var_asking_for_an_unusable_backend_is_a_clear_error(value):
    out = run_python(
        "import torch, fused_opt\nfused_opt.SGD([torch.zeros(2, requires_grad=True)])",
        FUSED_OPT_BACKEND=value,
    )
    assert out.returncode != 0
    expected = "is not available" if value == "cuda" else "Invalid backend"
    assert expected in out.stderr


# ---- the torch backend's CPU blocks ----------------------------------------------------------
# On the CPU the torch backend steps in blocks of _BLOCK_ELEMENTS elements per tensor list, large
# contiguous tensors cut into parts (fused_opt/_torch_kernels.py): the block size must change no
# bit of params or state, whatever the options, dtype, layout or per-param step counts.
BLOCKED_CASES = {
    "sgd": ("SGD", {"lr": 0.1}),
    "sgd-momentum-decay": (
        "SGD",
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "maximize": True},
    ),
    "sgd-nesterov": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "adam-l2-amsgrad": ("Adam", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    "adamw-maximize": ("AdamW", {"lr": 0.01, "maximize": True}),
}


@pytest.mark.parametrize("layout", ["contiguous", "one-transposed"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(BLOCKED_CASES))
def test_the_torch_backends_cpu_blocks_change_no_bit(case, dtype, layout, monkeypatch):
    # Contiguous lists of one dtype take the fast paths (torch's fused kernels; low-precision
    # SGD in fp32 vectors, its state read in place where it lies end to end); a transposed
    # param sends the call through the foreach code. Reloaded state tensors each have their
    # own memory (no span to read in place): they too change no bit.
    import torch

    import fused_opt
    from fused_opt import _torch_kernels

    name, options = BLOCKED_CASES[case]
    dt = getattr(torch, dtype)

    def run(block: int, module=fused_opt, reload: bool = False, **backend: str) -> list:
        monkeypatch.setattr(_torch_kernels, "_BLOCK_ELEMENTS", block)
        gen = torch.Generator().manual_seed(0)
        shapes = [(1000,), (37,), (64, 33), (), (0,), (3, 700), (16,), (16,)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s in shapes]
        if layout == "one-transposed":
            params.append(torch.nn.Parameter(torch.randn(40, 30, generator=gen).to(dt).t()))
        opt = getattr(module, name)(params, **backend, **options)
        for step in range(4):
            for i, p in enumerate(params):
                # params[1] sits the first step out: its step count trails the others'.
                skip = step == 0 and i == 1
                p.grad = None if skip else torch.randn(p.shape, generator=gen).to(dt)
            opt.step()
            if reload and step == 1:
                state_dict = opt.state_dict()
                opt = getattr(module, name)(params, **backend, **options)
                opt.load_state_dict(state_dict)
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        return [p.detach() for p in params] + state

    whole = run(1 << 40, backend="torch")
    for block, reload in ((5, False), (64, False), (999, False), (64, True)):
        blocked = run(block, reload=reload, backend="torch")
        assert len(blocked) == len(whole)
        for a, b in zip(blocked, whole, strict=True):
            assert torch.equal(a, b), (block, reload, a, b)
    if dt == torch.float32:  # and the blocks follow the oracle, step counts and all
        oracle = run(5, torch.optim, foreach=False)
        for a, b in zip(blocked, oracle, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("numel", [1000, 300_000], ids=["one-block", "cut-into-parts"])
def test_the_torch_backend_steps_leaf_params_with_grad_mode_on(numel):
    """As the compiled kernels do: the update is not something autograd records."""
    import torch

    import fused_opt
    from fused_opt import functional

    for backend in {"torch", "cpp"} & set(fused_opt.available_backends()):
        p = torch.nn.Parameter(torch.ones(numel))
        grads, buffers = [torch.ones(numel)], [torch.zeros(numel)]
        functional.sgd([p], grads, buffers, lr=0.5, momentum=0.9, is_first_step=True,
                       backend=backend)  # fmt: skip
        assert torch.equal(p.detach(), torch.full((numel,), 0.5)), backend
        assert torch.equal(buffers[0], torch.ones(numel)), backend
        q = torch.nn.Parameter(torch.ones(numel))
        state = [[torch.zeros(numel)], [torch.zeros(numel)], [], [torch.tensor(0.0)]]
        functional.adam([q], [torch.ones(numel)], *state, lr=0.1, backend=backend)
        torch.testing.assert_close(q.detach(), torch.full((numel,), 0.9))


def test_the_torch_backend_reads_adjacent_tensors_of_two_allocations_one_by_one():
    """Low-precision SGD reads a block's state as one vector where it lies end to end in one
    storage; tensors of two storages that merely touch in memory are read one by one."""
    import torch

    from fused_opt import functional

    def step(buffers: list) -> list:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(50, generator=gen).bfloat16() for _ in range(2)]
        grads = [torch.randn(50, generator=gen).bfloat16() for _ in range(2)]
        for b in buffers:
            b.copy_(torch.randn(50, generator=gen))
        functional.sgd(params, grads, buffers, lr=0.1, momentum=0.9, is_first_step=False,
                       backend="torch")  # fmt: skip
        return params + buffers

    memory = bytearray(200)  # two storages over adjacent halves of one buffer
    adjacent = [torch.frombuffer(memory, dtype=torch.bfloat16, count=50, offset=k * 100)
                for k in range(2)]  # fmt: skip
    assert adjacent[1].data_ptr() == adjacent[0].data_ptr() + 100
    separate = [torch.zeros(50, dtype=torch.bfloat16) for _ in range(2)]
    for a, b in zip(step(adjacent), step(separate), strict=True):
        assert torch.equal(a, b)


def test_the_torch_backends_low_precision_sgd_ignores_the_default_dtype():
    # Its fp32 copies are fp32 whatever torch's default dtype: a bf16 default once sent them
    # through torch's bf16 kernel, which left the params unchanged.
    import torch

    import fused_opt

    def run() -> list:
        gen = torch.Generator().manual_seed(0)
        data = [torch.randn(s, generator=gen, dtype=torch.float32) for s in (70, 300, 70, 300)]
        params = [torch.nn.Parameter(x.bfloat16()) for x in data[:2]]
        opt = fused_opt.SGD(params, lr=0.1, momentum=0.9, backend="torch")
        for _ in range(3):
            for p, g in zip(params, data[2:], strict=True):
                p.grad = g.bfloat16()
            opt.step()
        return [p.detach().clone() for p in params]

    expected = run()
    default = torch.get_default_dtype()
    for dtype in (torch.bfloat16, torch.float64):
        torch.set_default_dtype(dtype)
        try:
            got = run()
        finally:
            torch.set_default_dtype(default)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b), dtype


def test_the_torch_backend_bumps_the_version_of_tensors_it_writes_as_one_vector():
    # Params that are views of one buffer lie end to end: the step writes them through one
    # vector, and autograd must still see that each changed.
    import torch

    from fused_opt import functional

    flat = torch.randn(300).bfloat16()
    params = [flat[:100], flat[100:]]
    buffers = list(torch.zeros(300, dtype=torch.bfloat16).split([100, 200]))
    before = [p._version for p in params + buffers]
    functional.sgd(params, [torch.ones(100).bfloat16(), torch.ones(200).bfloat16()], buffers,
                   lr=0.1, momentum=0.9, is_first_step=False, backend="torch")  # fmt: skip
    assert all(t._version > v for t, v in zip(params + buffers, before, strict=True))
