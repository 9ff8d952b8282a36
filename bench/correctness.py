"""Whether each implementation's step gives torch.optim's results, before its speed is compared.

A step that skips part of the work is fast and wrong: torch 2.13's fused CPU SGD, for one, leaves
bf16 and fp16 params unchanged but for the last (numel % 32) elements of each, so it moves 8 of
the 10 bytes per element that SGD with momentum must. The benchmark therefore steps every
implementation on a small set of its own and compares the params with torch.optim's for-loop
(the reference of the test suite too); one that disagrees is marked in the tables and is never
the reference of a speed-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .implementations import Implementation
from .workloads import OptimizerSpec

__all__ = ["REFERENCE", "TOLERANCE", "wrong_results"]

REFERENCE = "torch for-loop"
# Sizes with and without a tail past the widest vector (32 bf16 elements), a 2-d and a 1-element
# param; three steps cover the first step's momentum initialisation and two more.
CHECK_SHAPES = ((1000,), (37,), (64, 33), (1,))
CHECK_STEPS = 3
# Large enough for every update to show in bf16 (at lr 1e-3 most of them round away).
CHECK_LR = 0.1
# |displacement - the reference's| / |the reference's displacement| (L2 over all params). Fused
# kernels round bf16 once per step where the for-loop rounds every op: up to about 0.03 here. A
# step that leaves params unchanged reads about 1.
TOLERANCE = 0.1


def _trajectory(
    impl: Implementation, spec: OptimizerSpec, start: list[Tensor], grads: list[list[Tensor]]
) -> Tensor:
    """All params after the steps, flattened into one float64 vector."""
    params = [p.clone().requires_grad_(True) for p in start]
    optimizer = impl.build(
        dataclasses.replace(spec, kwargs={**spec.kwargs, "lr": CHECK_LR}), params
    )
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return torch.cat([p.detach().double().flatten() for p in params])


def wrong_results(
    impls: Sequence[Implementation], spec: OptimizerSpec, dtype: torch.dtype, device: torch.device
) -> dict[str, str]:
    """{implementation: why its results are wrong} for those whose params, after CHECK_STEPS
    steps from the same start with the same grads, moved unlike the reference's. Implementations
    that cannot run the case, or raise here, are left to the timing to report."""
    reference = next((i for i in impls if i.name == REFERENCE), None)
    if reference is None:
        return {}
    gen = torch.Generator().manual_seed(0)

    def randn(shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    start = [randn(s) for s in CHECK_SHAPES]
    grads = [[randn(s) for s in CHECK_SHAPES] for _ in range(CHECK_STEPS)]
    origin = torch.cat([p.double().flatten() for p in start])
    expected = _trajectory(reference, spec, start, grads) - origin
    wrong = {}
    for impl in impls:
        if impl is reference or impl.unsupported(spec, dtype, device) is not None:
            continue
        try:
            moved = _trajectory(impl, spec, start, grads) - origin
        except Exception:  # noqa: BLE001 - the timed run reports it with the case
            continue
        difference = ((moved - expected).norm() / expected.norm()).item()
        if not difference <= TOLERANCE:  # NaN counts as wrong
            wrong[impl.name] = (
                f"after {CHECK_STEPS} steps its params moved unlike {REFERENCE}'s (relative "
                f"difference {difference:.2f}, tolerance {TOLERANCE})"
            )
    return wrong
