"""The benchmarks work: a seconds-long run of the comparison command and of one suite case.

No timing is asserted (the machine may be shared); what is checked is that every part runs,
that the bytes model and the speed-up logic say what the README says, and that the end-to-end
loss curves of torch.optim.AdamW and fused_opt.AdamW match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is a folder of the repository, not an installed package

from bench.compare import Result, add_speedups  # noqa: E402
from bench.measure import Timing, time_calls  # noqa: E402
from bench.workloads import OPTIMIZERS, WORKLOADS, OptimizerSpec, bytes_per_element  # noqa: E402


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # One thread: on a machine shared with other jobs, threads waiting on each other at every
    # op's barrier would make these seconds-long runs minutes long.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("spec", "fp32_bytes"),
    [
        (OPTIMIZERS["sgd"], 12),
        (OPTIMIZERS["sgd-momentum"], 20),
        (OPTIMIZERS["sgd-nesterov"], 20),
        (OPTIMIZERS["adam"], 28),
        (OPTIMIZERS["adamw"], 28),
        (OptimizerSpec("adam-amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}), 36),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_bytes_per_element_follows_the_stream_count(spec: OptimizerSpec, fp32_bytes: int) -> None:
    assert bytes_per_element(spec, torch.float32) == fp32_bytes
    assert bytes_per_element(spec, torch.bfloat16) == fp32_bytes // 2


def test_gpt2_small_workload_has_the_real_parameter_count() -> None:
    gpt2 = WORKLOADS["gpt2-small"]
    assert gpt2.tensors == 148
    assert gpt2.elements == 124_439_808
    assert gpt2.shapes[0] == (50257, 768)


def _result(impl: str, family: str, median_ms: float, spread: float) -> Result:
    r = Result("w", "fp32", "adamw", impl, family, "cpu", 1, 1, 1, 28)
    r.median_ms, r.spread = median_ms, spread
    return r


def test_speedup_is_over_the_fastest_torch_mode_and_flags_noise() -> None:
    rows = [
        _result("torch for-loop", "torch.optim", 30.0, 0.02),
        _result("torch fused", "torch.optim", 10.0, 0.02),
        _result("fused_opt cpp", "fused_opt", 5.0, 0.02),
        _result("fused_opt torch", "fused_opt", 20.0, 0.50),
    ]
    add_speedups(rows, noisy_spread=0.10)
    speedups = {r.implementation: r.speedup for r in rows}
    assert speedups == pytest.approx(
        {"torch for-loop": 1 / 3, "torch fused": 1.0, "fused_opt cpp": 2.0, "fused_opt torch": 0.5}
    )
    assert [r.noisy for r in rows] == [False, False, False, True]


def test_time_calls_warms_up_then_samples_within_the_limits() -> None:
    calls = []
    samples = time_calls(
        lambda: calls.append(1),
        torch.device("cpu"),
        Timing(warmup=2, min_repeats=4, max_repeats=6, budget_s=10.0),
    )
    assert len(samples.seconds) == 6  # the budget is not spent before max_repeats
    assert len(calls) == 2 + 6


def test_time_calls_stops_a_pathologically_slow_case_after_three_samples() -> None:
    timing = Timing(warmup=0, min_repeats=10, max_repeats=50, budget_s=0.0, limit_s=0.0)
    assert len(time_calls(lambda: None, torch.device("cpu"), timing).seconds) == 3


def test_comparison_command_smoke_run(tmp_path: Path) -> None:
    proc = _run("-m", "bench", "--smoke", "--no-peers", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch fused" in proc.stdout and "speed-up" in proc.stdout
    assert "[e2e]" in proc.stderr  # progress goes to stderr
    (json_path,) = tmp_path.glob("*_smoke.json")
    assert json_path.with_suffix(".png").stat().st_size > 0
    assert json_path.with_suffix(".md").read_text().startswith(json_path.stem[:10])  # the date
    payload = json.loads(json_path.read_text())
    timed = [r for r in payload["results"] if r["median_ms"] is not None]
    torch_modes = {"torch for-loop", "torch foreach", "torch fused"}
    assert {r["implementation"] for r in timed} >= torch_modes
    assert any(r["family"] == "fused_opt" for r in timed)
    for r in timed:
        assert r["gb_per_s"] > 0 and r["floor_fraction"] > 0 and r["speedup"] > 0
    assert payload["bandwidth"]
    runs = payload["e2e"]["runs"]
    assert runs[0]["implementation"] == "torch.optim.AdamW"
    assert any(run["implementation"].startswith("fused_opt.AdamW") for run in runs)
    for run in runs:
        assert run["max_abs_loss_diff"] < 1e-3, run  # the loss curves must match


def test_pytest_benchmark_suite_runs_one_tiny_case(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run(
        "-m", "pytest", "bench/test_optimizer_step.py", "--benchmark-only", "-q",
        "-p", "no:cacheprovider", "-k", "tiny-fp32-adamw-torch-fused", f"--benchmark-json={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    (bench,) = json.loads(out.read_text())["benchmarks"]
    assert bench["group"] == "tiny fp32 adamw"
    info = bench["extra_info"]
    assert info["elements"] == 2000 * 16 and info["bytes_per_step"] == 28 * 2000 * 16
    assert info["gb_per_s"] > 0
