"""What is benchmarked: parameter sets, optimizer settings, and the bytes a step must move.

Everything the comparison command and the pytest-benchmark suite share about *what* they measure
lives here, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "WORKLOADS",
    "OptimizerSpec",
    "Workload",
    "bytes_per_element",
    "gpt2_small_shapes",
    "make_tensors",
    "streams_of",
]


def gpt2_small_shapes(
    d: int = 768, layers: int = 12, context: int = 1024, vocab: int = 50257
) -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124,439,808 elements), in model order; other
    sizes of the same architecture with other arguments."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),  # attn.c_attn (Conv1D: in x out)
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f
    return shapes


@dataclass(frozen=True)
class Workload:
    """A list of parameter shapes, stepped as one param group."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    about: str
    # Grads apart in memory, among other allocations, as a backward pass leaves them (its
    # temporaries lie between them); else made one after another, each next to the last.
    scattered_grads: bool = False

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


def _large(elements: int) -> Workload:
    label = f"{elements // 2**20}M" if elements >= 2**20 else f"{elements // 2**10}K"
    return Workload(f"large-{label}", ((elements,),), f"one tensor of {elements:,} elements")


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("gpt2-small", tuple(gpt2_small_shapes()), "GPT-2 small: 124M params, 148 tensors"),
        Workload("many-small", ((4096,),) * 2000, "2000 tensors of 4096"),
        Workload(
            "many-small-scattered",
            ((4096,),) * 2000,
            "2000 tensors of 4096, grads scattered among other allocations as after a backward",
            scattered_grads=True,
        ),
        Workload("tiny", ((16,),) * 2000, "2000 tensors of 16: per-step overhead"),
        # A GPU-sized set (1.16B params, 4.6 GB in fp32 before grads and state): select it by
        # name, e.g. `--workloads gpt-1b` on a GPU machine; no CPU mode runs it.
        Workload(
            "gpt-1b",
            tuple(gpt2_small_shapes(d=2048, layers=21, context=2048)),
            "GPT-style 1.16B params (d 2048, 21 layers), 256 tensors",
        ),
        Workload("tiny-100", ((16,),) * 100, "100 tensors of 16: the test suite's smoke run"),
        _large(2**25),
        _large(2**22),
        _large(2**27),
    )
}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer setting: the torch.optim class name and its keyword arguments."""

    name: str
    cls: str  # "SGD" | "Adam" | "AdamW": the same name in torch.optim, fused_opt and optimi
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_adam(self) -> bool:
        return self.cls in ("Adam", "AdamW")


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd-momentum", "SGD", {"lr": 1e-3, "momentum": 0.9}),
        OptimizerSpec("sgd-nesterov", "SGD", {"lr": 1e-3, "momentum": 0.9, "nesterov": True}),
        OptimizerSpec("adam", "Adam", {"lr": 1e-3}),
        OptimizerSpec("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
        OptimizerSpec("sgd", "SGD", {"lr": 1e-3}),
    )
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def streams_of(spec: OptimizerSpec) -> int:
    """How many arrays one step streams per param: param, grad and each state tensor.

    The step reads every one of them and writes all but the grad back: SGD 2, SGD momentum /
    Nesterov 3 (+ the momentum buffer), Adam / AdamW 4 (+ exp_avg and exp_avg_sq), 5 with
    amsgrad (+ max_exp_avg_sq).
    """
    if spec.is_adam:
        return 5 if spec.kwargs.get("amsgrad") else 4
    return 3 if spec.kwargs.get("momentum", 0) != 0 else 2


def bytes_per_element(spec: OptimizerSpec, dtype: torch.dtype) -> int:
    """Bytes one step must move per parameter element: the memory traffic floor.

    Each stream is read once and, but the grad, written once, in the param's dtype (state has
    the param's dtype, as in torch.optim): fp32 plain SGD 12, SGD momentum/Nesterov 20,
    Adam/AdamW 28 (36 with amsgrad); bf16 half.
    """
    streams = streams_of(spec)
    return (2 * streams - 1) * torch.empty((), dtype=dtype).element_size()


# Allocations left between two scattered grads: 2000 grads of 4096 fp32 elements that a backward
# pass made lay a median 266 KB apart (2026-12-02), about 15 of their size between each two.
_SCATTER = 15


def make_tensors(
    workload: Workload, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """Random params ~ N(0, 1) and grads ~ N(0, 0.01^2) for ``workload``: never zeros."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(shape: tuple[int, ...], scale: float) -> Tensor:
        t = torch.randn(shape, generator=gen).mul_(scale)
        return t.to(device=device, dtype=dtype)

    params = [randn(s, 1.0) for s in workload.shapes]
    if not workload.scattered_grads:
        return params, [randn(s, 0.01) for s in workload.shapes]
    grads, between = [], []  # `between` holds the other allocations until every grad is made
    for s in workload.shapes:
        grads.append(randn(s, 0.01))
        between += [torch.empty(s, dtype=dtype, device=device) for _ in range(_SCATTER)]
    return params, grads
