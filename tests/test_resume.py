"""Checkpoint resume: stop mid-way, resume in a new process, end bitwise equal to one long run.

The loop is a realistic one: two param groups, dropout, bf16 autocast (fp16 on CUDA) with a
GradScaler whose scale grows and halves (overflows are injected before and after the
checkpoint), a warm-up + cosine schedule. The checkpoint holds the model, optimizer, scheduler
and scaler state and the RNG state, as practitioners save them.

Run a phase by hand: ``python tests/test_resume.py NAME BACKEND DEVICE START STOP LOAD SAVE``
(LOAD / SAVE: a checkpoint path or "-").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_opt

TOTAL_STEPS = 10
CHECKPOINT_AT = 5
OVERFLOW_AT = (2, 7)
OPTIMIZERS = {
    "SGD": (fused_opt.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "AdamW": (fused_opt.AdamW, {"weight_decay": 1e-2, "amsgrad": True}),
}


def build(name: str, backend: str, device: torch.device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, 4),
    ).to(device)
    cls, kwargs = OPTIMIZERS[name]
    groups = [
        {"params": model[0].parameters(), "lr": 1e-3},  # a lower lr for the "backbone"
        {"params": [*model[3].parameters(), *model[5].parameters()]},
    ]
    opt = cls(groups, lr=1e-2, backend=backend, **kwargs)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS - 3)
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[3])
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    return model, opt, schedule, scaler


def train(name: str, backend: str, device: torch.device, start: int, stop: int,
          load: Path | None = None, save: Path | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Steps ``start`` to ``stop`` (from ``load`` if given; checkpoint into ``save`` if given)."""
    model, opt, schedule, scaler = build(name, backend, device)
    if load is not None:
        checkpoint = torch.load(load, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"])
    autocast_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        with torch.autocast(device.type, dtype=autocast_dtype):
            loss = F.mse_loss(model(x.to(device)).float(), y.to(device))
        scaler.scale(loss).backward()
        if step in OVERFLOW_AT:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        schedule.step()
        opt.zero_grad()
    if save is not None:
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        torch.save(checkpoint, save)
    return [p.detach().cpu() for p in model.parameters()]


def run_in_new_process(*args: object) -> None:
    repo_root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(name, backend, device, tmp_path):
    middle, final = tmp_path / "middle.pt", tmp_path / "final.pt"
    train(name, backend, device, 0, CHECKPOINT_AT, save=middle)
    run_in_new_process(name, backend, device, CHECKPOINT_AT, TOTAL_STEPS, middle, final)
    resumed = torch.load(final, weights_only=True)["model"]

    uninterrupted = train(name, backend, device, 0, TOTAL_STEPS)
    assert len(resumed) == len(uninterrupted)
    for ours, expected in zip(resumed.values(), uninterrupted, strict=True):
        assert torch.equal(ours.cpu(), expected)


if __name__ == "__main__":
    name, backend, device, start, stop, load, save = sys.argv[1:8]
    train(
        name, backend, torch.device(device), int(start), int(stop),
        load=None if load == "-" else Path(load), save=None if save == "-" else Path(save),
    )  # fmt: skip
