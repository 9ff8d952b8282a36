"""SGD with momentum, dampening, Nesterov, weight decay and maximize: torch.optim.SGD, fused."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import Bucket, Call, FusedOptimizer, check_number, kernel_view, state_like

__all__ = ["SGD"]


class SGD(FusedOptimizer, torch.optim.SGD):
    """Drop-in for :class:`torch.optim.SGD` running fused_opt's kernels.

    Same arguments, defaults, checks and ``state_dict`` as torch.optim.SGD, plus ``backend``
    ("auto", "cpp", "cuda" or "torch"; default: $FUSED_OPT_BACKEND, else "auto").
    ``foreach`` and ``fused`` are accepted and stored for checkpoint compatibility; what runs
    is chosen by ``backend``. ``differentiable=True`` runs torch.optim's implementation.
    """

    _op = "sgd_"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str | None = None,
    ) -> None:
        self._init_backend(backend)
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused,
        )  # fmt: skip
        # GradScaler hands us grad_scale / found_inf instead of unscaling the grads itself.
        self._step_supports_amp_scaling = not differentiable

    # torch.optim.SGD trains with sparse grads (nn.Embedding(sparse=True)); so do we, through
    # its own step for the params that have them.
    _supports_sparse = True

    def _by_torch_optim(self, p: Tensor, grad: Tensor) -> bool:
        # torch's for-loop promotes a grad of another dtype; the kernels take the param's.
        return grad.is_sparse or grad.dtype != p.dtype

    def _torch_optim_step(self, group: dict[str, Any], index: list[int]) -> None:
        params = group["params"]
        if group["weight_decay"] != 0 and any(params[i].grad.is_sparse for i in index):
            # torch.optim.SGD fails here too, but only after updating the params before.
            raise RuntimeError(
                "SGD with weight_decay does not support sparse gradients: "
                "add(sparse, dense) is not supported"
            )
        super()._torch_optim_step(group, index)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        check_number(group["lr"], "lr", TypeError)
        for name in ("weight_decay", "momentum", "dampening"):
            check_number(group[name], name)

    def _plan_flags(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] != 0,)

    def _has_state(self, state: dict[str, Any]) -> bool:
        return state.get("momentum_buffer") is not None

    def _state_lists(
        self, group: dict[str, Any], owners: list[Tensor], backend: str
    ) -> tuple[list[list[Tensor]], bool]:
        if group["momentum"] == 0:
            return [[]], False
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in owners]
        if all(b is not None for b in buffers):
            return [buffers], False
        return [[]], True  # created by _call, once the step is known to happen

    def _call(self, group: dict[str, Any], bucket: Bucket, grads: list[Tensor] | None,
              grad_scale: Tensor | None, found_inf: Tensor | None) -> Call | None:  # fmt: skip
        (buffers,) = bucket.state
        done = None
        if bucket.first_step:
            # A skipped first step must not leave buffers behind (torch's fused SGD does, and
            # its next step then reads uninitialised memory): one host sync, at first steps only.
            if found_inf is not None and found_inf.item():
                return None
            new_buffers = state_like(bucket.owners)
            buffers = [kernel_view(b) for b in new_buffers] if bucket.viewed else new_buffers

            def done() -> None:
                for p, buffer in zip(bucket.owners, new_buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buffer

        lr = self._bucket_lr(group, bucket)
        overload = "tensor_lr" if isinstance(lr, Tensor) else "default"
        return Call(overload, (bucket.params, grads, buffers), (
            float(group["weight_decay"]), group["momentum"], lr, group["dampening"],
            group["nesterov"], group["maximize"], bucket.first_step, grad_scale, found_inf,
        ), done)  # fmt: skip
