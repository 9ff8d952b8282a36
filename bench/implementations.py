"""Who is benchmarked: torch.optim's three modes, every fused_opt backend, and peers if installed.

``discover()`` returns what can run in this process plus a note for everything that cannot
(a backend not built, a peer not installed), so the report says what was left out and why.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .workloads import OptimizerSpec

__all__ = ["Implementation", "discover"]

Build = Callable[[OptimizerSpec, list[Tensor]], torch.optim.Optimizer]
# Why an implementation cannot run a case (None: it can).
Unsupported = Callable[[OptimizerSpec, torch.dtype, torch.device], "str | None"]


def _always(spec: OptimizerSpec, dtype: torch.dtype, device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Implementation:
    name: str  # as shown in the table
    family: str  # "torch.optim" | "fused_opt" | "peer"
    build: Build
    unsupported: Unsupported = _always


# ---- torch.optim -------------------------------------------------------------------------
TORCH_MODES = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _torch_impl(mode: str) -> Implementation:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> torch.optim.Optimizer:
        return getattr(torch.optim, spec.cls)(params, **spec.kwargs, **TORCH_MODES[mode])

    return Implementation(f"torch {mode}", "torch.optim", build)


# ---- fused_opt ---------------------------------------------------------------------------
_BACKEND_DEVICE = {"cpp": "cpu", "cuda": "cuda"}


def _fused_opt_impl(fused_opt, backend: str) -> Implementation:  # noqa: ANN001
    def build(spec: OptimizerSpec, params: list[Tensor]) -> torch.optim.Optimizer:
        return getattr(fused_opt, spec.cls)(params, **spec.kwargs, backend=backend)

    def unsupported(spec: OptimizerSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        needs = _BACKEND_DEVICE.get(backend)
        return f"runs on {needs} only" if needs and device.type != needs else None

    return Implementation(f"fused_opt {backend}", "fused_opt", build, unsupported)


def _fused_opt_impls(notes: list[str]) -> list[Implementation]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import fused_opt
            from fused_opt import _ops
        except Exception as exc:  # an API still being written, a broken build
            notes.append(f"fused_opt: cannot be imported ({type(exc).__name__}: {exc})")
            return []
    for w in caught:
        if w.category.__name__ == "FallbackWarning":
            notes.append(f"fused_opt: {str(w.message).split(';')[0].removeprefix('fused_opt: ')}")
    for backend, reason in sorted(_ops.LOAD_ERRORS.items()):
        notes.append(f"fused_opt {backend}: not available ({reason})")
    return [_fused_opt_impl(fused_opt, b) for b in fused_opt.available_backends()]


# ---- peers (the optional extra `bench`) ----------------------------------------------------
def _deepspeed_impl() -> Implementation:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> torch.optim.Optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # The AdamW switch was renamed across DeepSpeed versions.
        sig = inspect.signature(DeepSpeedCPUAdam).parameters
        mode_arg = "adamw_mode" if "adamw_mode" in sig else "adam_w_mode"
        kwargs = {"lr": spec.kwargs["lr"], "weight_decay": spec.kwargs.get("weight_decay", 0.0)}
        return DeepSpeedCPUAdam(params, **kwargs, **{mode_arg: spec.cls == "AdamW"})

    def unsupported(spec: OptimizerSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        if not spec.is_adam:
            return "Adam/AdamW only"
        if device.type != "cpu":
            return "CPU only"
        if dtype != torch.float32:
            return "keeps fp32 state for low-precision params (moves more bytes)"
        return None

    return Implementation("DeepSpeed CPUAdam", "peer", build, unsupported)


def _optimi_impl() -> Implementation:
    def build(spec: OptimizerSpec, params: list[Tensor]) -> torch.optim.Optimizer:
        import optimi

        kwargs = {k: v for k, v in spec.kwargs.items() if k != "nesterov"}
        # Kahan summation adds a state tensor for bf16 params: off, so the bytes match.
        return getattr(optimi, spec.cls)(params, **kwargs, kahan_sum=False, foreach=True)

    def unsupported(spec: OptimizerSpec, dtype: torch.dtype, device: torch.device) -> str | None:
        return "has no Nesterov SGD" if spec.kwargs.get("nesterov") else None

    return Implementation("optimi foreach", "peer", build, unsupported)


_PEERS = {
    "deepspeed": ("DeepSpeed CPUAdam", _deepspeed_impl),
    "optimi": ("optimi (torch-optimi)", _optimi_impl),
}


def _peer_impls(notes: list[str]) -> list[Implementation]:
    found = []
    for module, (label, make) in _PEERS.items():
        if importlib.util.find_spec(module) is None:
            notes.append(f"{label}: not installed (pip install -e '.[peers]' adds the peers)")
        else:
            found.append(make())
    return found


def discover(peers: bool = True) -> tuple[list[Implementation], list[str]]:
    """Every implementation that can run here, and notes on those that cannot."""
    notes: list[str] = []
    impls = [_torch_impl(mode) for mode in TORCH_MODES]
    impls += _fused_opt_impls(notes)
    if peers:
        impls += _peer_impls(notes)
    return impls, notes
