"""Helpers to run fused_opt and torch.optim side by side and compare everything they hold.

torch.optim is the oracle. These helpers only build inputs and compare outputs; they never
reimplement an optimizer, so the reference stays independent of the code under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import fused_opt

# Sizes that hit every edge of a vectorised, chunked kernel: a scalar, a single element,
# fewer elements than a SIMD register, one short of a power of two, one past a chunk size, 2-D.
AWKWARD_SHAPES: list[tuple[int, ...]] = [(), (1,), (7,), (1023,), (4097,), (33, 65)]

FUSED_CLASSES = {"SGD": fused_opt.SGD, "Adam": fused_opt.Adam, "AdamW": fused_opt.AdamW}
TORCH_CLASSES = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}

STATE_KEYS = {
    "SGD": ("momentum_buffer",),
    "Adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "AdamW": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
}

# Tolerances of a 50-step fp32 / fp64 trajectory against torch.optim's for-loop implementation.
TIGHT = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
}


def make_params(
    shapes: Sequence[tuple[int, ...]] = AWKWARD_SHAPES,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[Tensor]:
    """Leaf tensors with random values, drawn in fp32 and cast, so every dtype sees the same."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        if dtype.is_complex:
            value = torch.view_as_complex(torch.randn((*shape, 2), generator=gen))
        else:
            value = torch.randn(shape, generator=gen)
        params.append(value.to(device=device, dtype=dtype).requires_grad_())
    return params


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    """Independent copies of ``params`` (values only), ready for a second optimizer."""
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def random_grads(params: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """One gradient per param, fresh random values, drawn in fp32 and cast to the param's dtype."""
    real = [torch.view_as_real(p) if p.is_complex() else p for p in params]
    grads = [torch.randn(r.shape, generator=gen).to(device=r.device, dtype=r.dtype) for r in real]
    return [
        torch.view_as_complex(g) if p.is_complex() else g
        for p, g in zip(params, grads, strict=True)
    ]


def grad_stream(params: Sequence[Tensor], seed: int = 1) -> Iterator[list[Tensor]]:
    """An endless, reproducible sequence of gradient lists for ``params``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield random_grads(params, gen)


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def train(
    optimizers_and_params: Sequence[tuple[torch.optim.Optimizer, Sequence[Tensor]]],
    steps: int,
    seed: int = 1,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """Step every optimizer ``steps`` times, all of them on the same gradients."""
    reference_params = optimizers_and_params[0][1]
    grads = grad_stream(reference_params, seed)
    for i in range(steps):
        step_grads = next(grads)
        for opt, params in optimizers_and_params:
            set_grads(params, step_grads)
            opt.step()
        if after_step is not None:
            after_step(i)


def states_of(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[dict[str, Any]]:
    return [opt.state.get(p, {}) for p in params]


def assert_same_tensors(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    ref_params: Sequence[Tensor],
    ref_states: Sequence[dict[str, Any]],
    **tolerance: Any,
) -> None:
    """Params and every state tensor agree within ``tolerance``; ``step`` counts agree exactly."""
    tolerance.setdefault("equal_nan", True)
    assert len(params) == len(ref_params)
    for i, (p, q, state, ref_state) in enumerate(
        zip(params, ref_params, states, ref_states, strict=True)
    ):
        torch.testing.assert_close(
            p.detach(), q.detach(), **tolerance, msg=lambda m, i=i: f"param {i}: {m}"
        )
        assert set(state) == set(ref_state), (
            f"param {i}: state keys {set(state)} != {set(ref_state)}"
        )
        for key, ref_value in ref_state.items():
            value = state[key]
            if ref_value is None:
                assert value is None, f"param {i}: {key} should be None"
            elif key == "step":
                assert (value.dtype, value.device, value.shape) == (
                    ref_value.dtype, ref_value.device, ref_value.shape
                ), f"param {i}: step is {value!r}, torch.optim has {ref_value!r}"  # fmt: skip
                assert value.item() == ref_value.item(), f"param {i}: step differs"
            else:
                torch.testing.assert_close(
                    value, ref_value, **tolerance, msg=lambda m, i=i, k=key: f"param {i} {k}: {m}"
                )


def assert_same_state(
    ours: torch.optim.Optimizer,
    ours_params: Sequence[Tensor],
    ref: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    **tolerance: Any,
) -> None:
    """Two optimizers hold the same params and state (see ``assert_same_tensors``)."""
    assert_same_tensors(
        ours_params,
        states_of(ours, ours_params),
        ref_params,
        states_of(ref, ref_params),
        **tolerance,
    )


def snapshot(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[str, Any]:
    """A deep copy of every tensor an optimizer step may modify."""
    return {
        "params": [p.detach().clone() for p in params],
        "state": copy.deepcopy(
            {i: dict(opt.state[p]) for i, p in enumerate(params) if p in opt.state}
        ),
    }


def assert_unchanged(
    opt: torch.optim.Optimizer, params: Sequence[Tensor], before: dict[str, Any]
) -> None:
    """Nothing a step could modify differs (bitwise, NaN included) from ``before``."""
    after = snapshot(opt, params)
    for i, (a, b) in enumerate(zip(after["params"], before["params"], strict=True)):
        torch.testing.assert_close(
            a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"param {i} changed: {m}"
        )
    assert set(after["state"]) == set(before["state"]), "state was created or dropped"
    for i, state in before["state"].items():
        assert set(after["state"][i]) == set(state), f"state keys of param {i} changed"
        for key, value in state.items():
            if isinstance(value, Tensor):
                torch.testing.assert_close(
                    after["state"][i][key], value, rtol=0, atol=0, equal_nan=True,
                    msg=lambda m, i=i, k=key: f"state {k} of param {i} changed: {m}",
                )  # fmt: skip


class RoundedFp32Oracle:
    """torch.optim's for-loop implementation on fp32 copies, rounded to ``dtype`` after each step.

    This is the low-precision contract of every fused_opt backend (and of torch's fused Adam):
    load fp16/bf16, compute in fp32, round once on store. torch's own for-loop implementation
    on fp16/bf16 tensors rounds after every op instead, so it is only a loose reference there.
    """

    def __init__(
        self, name: str, params: Sequence[Tensor], dtype: torch.dtype, **kwargs: Any
    ) -> None:
        self.dtype = dtype
        self.params = [p.detach().float().requires_grad_() for p in params]
        self.opt = TORCH_CLASSES[name](self.params, foreach=False, **kwargs)

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        set_grads(self.params, [g.float() for g in grads])
        self.opt.step()
        for p in self.params:
            p.copy_(p.to(self.dtype))
            for key, value in self.opt.state[p].items():
                if key != "step":
                    value.copy_(value.to(self.dtype))

    def params_and_states(self) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """The oracle's params and state in ``dtype`` (``step`` as it is)."""
        params = [p.detach().to(self.dtype) for p in self.params]
        states = [
            {k: (v if k == "step" else v.to(self.dtype)) for k, v in self.opt.state[p].items()}
            for p in self.params
        ]
        return params, states


def assert_close_to_scale(actual: Tensor, expected: Tensor, fraction: float, what: str) -> None:
    """Every element of ``actual`` within ``fraction`` of the largest magnitude in ``expected``."""
    if expected.numel() == 0:
        return
    scale = expected.detach().float().abs().max().item()
    error = (actual.detach().float() - expected.detach().float()).abs().max().item()
    assert error <= fraction * scale + 1e-6, (
        f"{what}: max error {error:.3g} > {fraction} * {scale:.3g}"
    )


class FusedOpCounter(TorchDispatchMode):
    """Counts the calls of fused_opt's ops that reach the dispatcher while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "fused_opt"
        return func(*args, **(kwargs or {}))
