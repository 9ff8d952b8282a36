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
    print("backend:", ours.backend, "equal:", torch.equal(a, b))
"""


def test_missing_kernels_warn_once_and_the_torch_backend_runs():
    out = run_python(TRAIN_AND_COMPARE, FUSED_OPT_DISABLE_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout  # the remedy
    assert "FUSED_OPT_BACKEND=torch" in out.stdout
    assert "available: ['torch']" in out.stdout
    assert "cpp: fused_opt backend 'cpp' is not available" in out.stdout
    assert "backend: torch equal: True" in out.stdout


def test_choosing_the_torch_backend_silences_the_warning():
    out = run_python(TRAIN_AND_COMPARE, FUSED_OPT_DISABLE_NATIVE="1", FUSED_OPT_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert "warnings: 0" in out.stdout
    assert "backend: torch equal: True" in out.stdout


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
    assert "backend: torch equal: True" in out.stdout


@pytest.mark.parametrize("value", ["cuda", "nonsense"])
def test_env_var_asking_for_an_unusable_backend_is_a_clear_error(value):
    out = run_python(
        "import torch, fused_opt\nfused_opt.SGD([torch.zeros(2, requires_grad=True)])",
        FUSED_OPT_BACKEND=value,
    )
    assert out.returncode != 0
    expected = "is not available" if value == "cuda" else "Invalid backend"
    assert expected in out.stderr
