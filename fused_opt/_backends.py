"""Which implementation runs: the ``backend=`` keyword, FUSED_OPT_BACKEND, and what loaded."""

from __future__ import annotations

import os

import torch

from . import _ops

__all__ = ["BACKENDS", "available_backends", "normalize", "resolve"]

BACKENDS = ("auto", "cpp", "cuda", "torch")
# The device type each compiled backend runs on.
_DEVICE_OF = {"cpp": "cpu", "cuda": "cuda"}


def _usable(backend: str) -> bool:
    return _ops.cuda_ready() if backend == "cuda" else backend in _ops.COMPILED


def available_backends() -> list[str]:
    """Backends that can run in this process, best first (``torch`` is always there)."""
    return [name for name in ("cuda", "cpp") if _usable(name)] + ["torch"]


def normalize(requested: str | None) -> str:
    """Validate a ``backend=`` value (None means FUSED_OPT_BACKEND, else ``auto``)."""
    if requested is None:
        requested = os.environ.get("FUSED_OPT_BACKEND", "").strip().lower() or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"Invalid backend: {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested in _DEVICE_OF and not _usable(requested):
        reason = _ops.LOAD_ERRORS.get(requested, "not built")
        raise RuntimeError(
            f"fused_opt backend {requested!r} is not available ({reason}). "
            f"Available: {', '.join(available_backends())}"
        )
    return requested


def resolve(requested: str, device: torch.device) -> str:
    """The backend that runs for tensors on ``device`` (``requested`` already normalized).

    A GPU that the CUDA binary holds no code for gets the torch backend under "auto" (with one
    FallbackWarning, see _ops.cuda_problem) and a RuntimeError when "cuda" is forced."""
    if requested == "auto":
        if device.type == "cuda":
            return "cuda" if _ops.cuda_problem(device) is None else "torch"
        if device.type == "cpu" and "cpp" in _ops.COMPILED:
            return "cpp"
        return "torch"
    if requested in _DEVICE_OF and device.type != _DEVICE_OF[requested]:
        raise ValueError(
            f"fused_opt backend {requested!r} runs on {_DEVICE_OF[requested]} tensors, "
            f"but a param is on {device}; use backend='auto' for params on several devices"
        )
    if requested == "cuda" and (problem := _ops.cuda_problem(device)) is not None:
        raise RuntimeError(f"fused_opt backend 'cuda' cannot run on {device}: {problem}")
    return requested
