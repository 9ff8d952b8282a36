"""End to end: a small GPT-style language model trained on generated arithmetic text.

The same model (same initial weights) is trained on the same batches with each optimizer;
a training iteration is timed whole (zero_grad, forward, backward, step) and the step on its
own, so the optimizer's share of an iteration is measured, not guessed. The loss curves must
match: fused_opt follows torch.optim's math, so they differ only by float rounding.
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .measure import synchronizer

__all__ = ["LMConfig", "E2EResult", "arithmetic_text", "TinyGPT", "run_e2e"]

VOCAB = "0123456789+-*=;"


def arithmetic_text(n_chars: int, seed: int = 0) -> str:
    """Correct sums, differences and products of small numbers: '12+7=19;40-3=37;...'."""
    rng = random.Random(seed)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    pieces, size = [], 0
    while size < n_chars:
        a, b, op = rng.randrange(100), rng.randrange(100), rng.choice("+-*")
        if op == "-" and b > a:
            a, b = b, a
        piece = f"{a}{op}{b}={ops[op](a, b)};"
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)[:n_chars]


@dataclass(frozen=True)
class LMConfig:
    d_model: int = 192
    n_layers: int = 3
    n_heads: int = 6
    context: int = 64
    batch: int = 16
    steps: int = 20
    warmup_steps: int = 3  # trained and in the loss curve, but not timed
    lr: float = 1e-3
    weight_decay: float = 0.1


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks, a tied output head."""

    def __init__(self, cfg: LMConfig, vocab: int = len(VOCAB)) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for name, p in self.named_parameters():  # GPT-2's init: small weights, zero biases
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T


@dataclass
class E2EResult:
    implementation: str
    params: int
    iteration_ms: float  # median of a whole training iteration
    step_ms: float  # median of optimizer.step() alone
    step_share: float  # step_ms / iteration_ms
    spread: float  # IQR / median of the iteration times
    losses: list[float] = field(default_factory=list)
    max_abs_loss_diff: float = 0.0  # against the first implementation (the reference)

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(cfg: LMConfig, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    tokens = torch.tensor(
        [VOCAB.index(c) for c in arithmetic_text(cfg.batch * cfg.steps * (cfg.context + 1) + 1)]
    )
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - cfg.context - 1, (cfg.steps, cfg.batch), generator=gen)
    out = []
    for row in starts:
        window = torch.stack([tokens[s : s + cfg.context + 1] for s in row.tolist()]).to(device)
        out.append((window[:, :-1], window[:, 1:]))
    return out


def _iqr_spread(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / q2


def run_e2e(
    optimizers: dict[str, Callable[[list[nn.Parameter], LMConfig], torch.optim.Optimizer]],
    cfg: LMConfig,
    device: torch.device,
) -> list[E2EResult]:
    """Train the same model with each optimizer factory; the first one is the reference."""
    torch.manual_seed(0)
    initial = TinyGPT(cfg).to(device)
    batches = _batches(cfg, device)
    sync = synchronizer(device)
    # Untimed passes first, so one-time costs (thread pools, allocator) do not land on the
    # first implementation.
    for x, y in batches[:2]:
        F.cross_entropy(initial(x).flatten(0, 1), y.flatten()).backward()
    initial.zero_grad(set_to_none=True)
    results: list[E2EResult] = []
    for name, make in optimizers.items():
        model = copy.deepcopy(initial)
        params = list(model.parameters())
        optimizer = make(params, cfg)
        losses, iteration_s, step_s = [], [], []
        for i, (x, y) in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            sync()
            t1 = time.perf_counter()
            optimizer.step()
            sync()
            t2 = time.perf_counter()
            losses.append(loss.item())
            if i >= cfg.warmup_steps:
                iteration_s.append(t2 - t0)
                step_s.append(t2 - t1)
        iteration, step = statistics.median(iteration_s), statistics.median(step_s)
        diff = (
            max(abs(a - b) for a, b in zip(losses, results[0].losses, strict=True))
            if results
            else 0.0
        )
        results.append(
            E2EResult(
                name,
                sum(p.numel() for p in params),
                iteration * 1e3,
                step * 1e3,
                step / iteration,
                _iqr_spread(iteration_s),
                losses,
                diff,
            )
        )
        print(
            f"[e2e] {name:<22} {iteration * 1e3:8.2f} ms/iteration, step {step * 1e3:7.3f} ms "
            f"({100 * step / iteration:4.1f}%), final loss {losses[-1]:.4f}, "
            f"max |loss diff| vs {results[0].implementation}: {diff:.2e}",
            file=sys.stderr,
            flush=True,
        )
    return results
