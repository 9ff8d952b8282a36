"""Adam and AdamW (amsgrad, maximize, L2 or decoupled weight decay): torch.optim's, fused."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..functional import hyper_for
from ._base import Bucket, Call, FusedOptimizer, check_number, state_like, zero_scalars

__all__ = ["Adam", "AdamW"]

# torch < 2.6 has no decoupled_weight_decay argument (AdamW was a class of its own).
_TORCH_ADAM_DECOUPLES = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters


def _step_dtype() -> torch.dtype:
    # torch.optim keeps `step` in float32 (float64 when that is the default dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _AdamFamily(FusedOptimizer):
    """State handling and the kernel call shared by Adam and AdamW."""

    _op = "adam_"
    _always_decoupled = False

    def _plan_flags(self, group: dict[str, Any]) -> tuple:
        return (group["amsgrad"],)

    def _state_lists(
        self, group: dict[str, Any], owners: list[Tensor], backend: str
    ) -> tuple[list[list[Tensor]], bool]:
        states = [self.state[p] for p in owners]
        fresh = [p for p, state in zip(owners, states, strict=True) if not state]
        # Where torch.optim keeps `step`: on the param's device when capturable or fused (the
        # owners of a bucket share one device). The CUDA kernels keep it there always, as
        # torch's fused Adam does: a step then never reads the GPU from the host, not even
        # GradScaler's found_inf. torch.optim loads such a checkpoint as it is, and a CPU
        # `step` loaded from one of its own moves to the device here, once.
        on_device = group["capturable"] or group["fused"] or backend == "cuda"
        device = owners[0].device if on_device else torch.device("cpu")
        if backend == "cuda":
            for state in states:
                step = state.get("step")
                if isinstance(step, Tensor) and step.device != device:
                    state["step"] = step.to(device)
        steps = zero_scalars(len(fresh), _step_dtype(), device)
        for p, step, exp_avg, exp_avg_sq in zip(fresh, steps, state_like(fresh),
                                                state_like(fresh), strict=True):  # fmt: skip
            self.state[p].update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        if group["amsgrad"]:
            unmaxed = [p for p, state in zip(owners, states, strict=True)
                       if "max_exp_avg_sq" not in state]  # fmt: skip
            for p, max_exp_avg_sq in zip(unmaxed, state_like(unmaxed), strict=True):
                self.state[p]["max_exp_avg_sq"] = max_exp_avg_sq
        lists = [
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
        ]
        return lists, bool(fresh)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        check_number(lr, "lr", TypeError)
        beta1, beta2 = group["betas"]
        check_number(beta1, "betas[0]")
        check_number(beta2, "betas[1]")
        check_number(group["weight_decay"], "weight_decay")
        check_number(group["eps"], "eps")
        if not isinstance(beta1, Tensor) and float(beta1) == 1 and not isinstance(lr, Tensor):
            # torch.optim divides lr by the bias correction 1 - beta1 ** step, here 0 (a tensor
            # beta1 makes that tensor arithmetic: inf, no error, and no host read here).
            raise ZeroDivisionError("float division by zero (betas[0] == 1)")

    def _state_by_torch_optim(self, state: dict[str, Any]) -> bool:
        step = state.get("step")
        return super()._state_by_torch_optim(state) or (
            isinstance(step, Tensor) and not step.is_floating_point()
        )

    def _call(self, group: dict[str, Any], bucket: Bucket, grads: list[Tensor] | None,
              grad_scale: Tensor | None, found_inf: Tensor | None) -> Call:  # fmt: skip
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = bucket.state
        beta1, beta2 = group["betas"]
        decoupled = self._always_decoupled or group.get("decoupled_weight_decay", False)
        overload, hyper = hyper_for(bucket.device, group["lr"], beta1, beta2,
                                    group["weight_decay"], self._moved(group))  # fmt: skip
        return Call(overload, (
            bucket.params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        ), (
            *hyper, group["eps"], group["amsgrad"], group["maximize"], decoupled, grad_scale,
            found_inf,
        ))  # fmt: skip


class Adam(_AdamFamily, torch.optim.Adam):
    """Drop-in for :class:`torch.optim.Adam` running fused_opt's kernels.

    Same arguments, defaults, checks and ``state_dict`` as torch.optim.Adam, plus ``backend``
    ("auto", "cpp", "cuda" or "torch"; default: $FUSED_OPT_BACKEND, else "auto").
    ``foreach`` and ``fused`` are accepted and stored for checkpoint compatibility; what runs is
    chosen by ``backend``. ``capturable=True`` keeps ``step`` on the device (needed to capture the
    step in a CUDA graph); it changes nothing on the CPU. ``differentiable=True`` runs
    torch.optim's implementation.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str | None = None,
    ) -> None:
        self._init_backend(backend)
        extra = {"decoupled_weight_decay": decoupled_weight_decay} if _TORCH_ADAM_DECOUPLES else {}
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, **extra,
        )  # fmt: skip
        if not _TORCH_ADAM_DECOUPLES:
            self.defaults["decoupled_weight_decay"] = decoupled_weight_decay
            for group in self.param_groups:
                group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self._step_supports_amp_scaling = not differentiable


class AdamW(_AdamFamily, torch.optim.AdamW):
    """Drop-in for :class:`torch.optim.AdamW` running fused_opt's kernels (see :class:`Adam`)."""

    _always_decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
    ) -> None:
        self._init_backend(backend)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = not differentiable
