"""``python -m fused_opt``: what was built, what runs here, and a check against torch.optim."""

from __future__ import annotations

import os
import platform
import sys
import warnings

import torch

import fused_opt
from fused_opt import _ops


def _cpu_report() -> list[str]:
    native = _ops.native_module("cpp")
    if native is None:
        return [f"  cpp      not loaded: {_ops.LOAD_ERRORS.get('cpp', 'not built')}"]
    return [
        f"  cpp      SIMD variants compiled: {', '.join(native.isa_compiled())}",
        f"           this CPU runs: {', '.join(native.isa_supported())}; "
        f"active: {native.isa_active()} (force a lower one with FUSED_OPT_CPU_ISA)",
        f"           accelerator (direct entry points): {_ops.DIRECT_NOTE}",
    ]


def _device_problems() -> dict[int, str | None]:
    """cuda:index -> why the CUDA kernels cannot run there (None: they run), per visible GPU."""
    if not _ops.cuda_ready():
        return {}
    with warnings.catch_warnings():  # the report says it; no FallbackWarning on top
        warnings.simplefilter("ignore", _ops.FallbackWarning)
        return {
            i: _ops.cuda_problem(torch.device("cuda", i)) for i in range(torch.cuda.device_count())
        }


def _cuda_report() -> list[str]:
    if not _ops.cuda_ready():
        return [f"  cuda     not loaded: {_ops.LOAD_ERRORS.get('cuda', 'not built')}"]
    lines = ["  cuda     loaded"]
    for i, problem in _device_problems().items():
        major, minor = torch.cuda.get_device_capability(i)
        status = "runs the CUDA kernels" if problem is None else f"torch backend: {problem}"
        lines.append(f"           cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor}): "
                     f"{status}")  # fmt: skip
    return lines


def _sanity_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sanity_check() -> list[tuple[str, str, str, float]]:
    """Two steps of each optimizer and backend vs torch.optim: (name, backend, device, error)."""
    results = []
    cases = {
        "SGD": (fused_opt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        "Adam": (fused_opt.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
        "AdamW": (fused_opt.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    }
    generator = torch.Generator().manual_seed(0)
    for device in _sanity_devices():
        backends = [
            b
            for b in fused_opt.available_backends()
            if b in ("torch", "cpp" if device == "cpu" else "cuda")
            and not (b == "cuda" and _device_problems().get(torch.cuda.current_device()))
        ]
        for name, (ours, theirs, kwargs) in cases.items():
            for backend in backends:
                start = torch.randn(1000, generator=generator).to(device)
                grads = [torch.randn(1000, generator=generator).to(device) for _ in range(2)]
                a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
                opt_a = ours([a], backend=backend, **kwargs)
                opt_b = theirs([b], foreach=False, **kwargs)
                for g in grads:
                    a.grad, b.grad = g.clone(), g.clone()
                    opt_a.step()
                    opt_b.step()
                results.append((name, backend, device, (a - b).abs().max().item()))
    return results


def unusable_builds() -> list[str]:
    """What was built but cannot run here, each with the reason: a health check's failures.
    CUDA kernels on a machine without a GPU are not among them (nothing to run them on)."""
    info = _ops.BUILD_INFO
    if not info.get("extensions"):
        return []
    problems = []
    if "cpp" not in _ops.COMPILED and os.environ.get("FUSED_OPT_DISABLE_NATIVE") != "1":
        problems.append(
            f"the CPU kernels were built but do not load: {_ops.LOAD_ERRORS.get('cpp')}"
        )
    if info.get("cuda_version") and not _ops.cuda_ready() and torch.cuda.is_available():
        problems.append(
            f"the CUDA kernels were built but do not load: {_ops.LOAD_ERRORS.get('cuda')}"
        )
    for i, problem in _device_problems().items():
        if problem is not None:
            problems.append(f"cuda:{i}: {problem}")
    return problems


def main() -> int:
    info = _ops.BUILD_INFO
    lines = [
        f"fused_opt {fused_opt.__version__}  (python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.machine()})",
        "built:",
    ]
    if not info:
        lines.append(
            "  no build info (a source tree never built: pip install --no-build-isolation -e .)"
        )
    elif not info.get("extensions"):
        lines.append("  pure Python, no compiled kernels (FUSED_OPT_BUILD_EXT=0)")
    else:
        direct = f"torch {info.get('torch_version')}, python {info.get('direct_python', '?')}"
        lines += [
            f"  against torch {info.get('torch_version')} with {info.get('compiler', '?')}",
            f"  stable ABI: torch >= {info.get('torch_target', '?')}, python >= "
            f"{info.get('python_target', '?')} (abi3); the accelerator: {direct} only",
            f"  CPU SIMD variants: {', '.join(info.get('cpu_isas', [])) or 'none'}",
            f"  CUDA: {info.get('cuda_version') or 'not built'}; archs: "
            f"{', '.join(info.get('cuda_archs', [])) or '-'}",
        ]
    lines += ["runs here:", f"  backends available: {', '.join(fused_opt.available_backends())}"]
    lines += _cpu_report() + _cuda_report()
    lines.append("sanity check (2 steps vs torch.optim for-loop, max |difference|):")
    failed = False
    for name, backend, device, error in sanity_check():
        ok = error <= 1e-5
        failed |= not ok
        lines.append(
            f"  {name:6s} {backend:6s} {device:5s} {error:.2e}  {'ok' if ok else 'FAILED'}"
        )
    problems = unusable_builds()
    lines += [f"FAILED: {problem}" for problem in problems]
    print("\n".join(lines))
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
