"""The benchmarks work: a seconds-long run of the comparison command and of one suite case.

No timing is asserted (the machine may be shared); what is checked is that every part runs,
that the bytes model and the speed-up logic say what the README says, and that the end-to-end
loss curves of torch.optim.AdamW and fused_opt.AdamW match.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is a folder of the repository, not an installed package

from bench.cli import _slow_floor_note, wrong_result_notes  # noqa: E402
from bench.compare import Case, Result, add_paired_ratios, run_cases  # noqa: E402
from bench.correctness import wrong_results  # noqa: E402
from bench.implementations import Implementation, discover  # noqa: E402
from bench.measure import BandwidthProbe, Timing, time_calls, time_rounds  # noqa: E402
from bench.report import summary_table  # noqa: E402
from bench.workloads import (  # noqa: E402
    DTYPES,
    OPTIMIZERS,
    WORKLOADS,
    OptimizerSpec,
    bytes_per_element,
    make_tensors,
    streams_of,
)
from fused_opt._ops import native_module  # noqa: E402

AMSGRAD = OptimizerSpec("adam-amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True})


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
        (AMSGRAD, 36),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_bytes_per_element_follows_the_stream_count(spec: OptimizerSpec, fp32_bytes: int) -> None:
    assert bytes_per_element(spec, torch.float32) == fp32_bytes
    assert bytes_per_element(spec, torch.bfloat16) == fp32_bytes // 2


@pytest.mark.skipif(native_module("cpp") is None, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("spec", [*OPTIMIZERS.values(), AMSGRAD], ids=lambda s: s.name)
def test_the_floor_pass_has_the_step_shape(spec: OptimizerSpec) -> None:
    """The probe streams as many arrays as the step and moves the same bytes per element."""
    probe = BandwidthProbe(torch.device("cpu"), 4096)
    probe.use_streams(streams_of(spec))
    assert probe.bytes_per_pass == bytes_per_element(spec, torch.float32) * 4096
    assert "stream_pass" in probe.kind
    assert probe() > 0 and probe.time_one_pass() > 0
    assert len(probe.reference_rates) == len(probe.rates) == 1 and probe.reference_rates[0] > 0


@pytest.mark.parametrize(
    ("probes", "references", "noted"),
    [
        ([50.0, 52.0, 48.0], [45.0, 49.0, 50.0], False),  # faster in most cases: the floor holds
        ([40.0, 52.0, 44.0], [45.0, 49.0, 50.0], True),  # slower in most: fractions read high
        ([40.0], [], False),  # no reference (CUDA, or torch's pass itself)
    ],
)
def test_a_floor_pass_slower_than_torchs_is_noted(probes, references, noted) -> None:
    note = _slow_floor_note(2, probes, references)
    assert (note is not None) == noted
    if noted:
        assert "2 of 3 cases" in note and "read too high" in note


def test_gpt2_small_workload_has_the_real_parameter_count() -> None:
    gpt2 = WORKLOADS["gpt2-small"]
    assert gpt2.tensors == 148
    assert gpt2.elements == 124_439_808
    assert gpt2.shapes[0] == (50257, 768)


def test_scattered_grads_lie_apart_with_the_same_values() -> None:
    """many-small-scattered: many-small's tensors, its grads apart as a backward leaves them."""
    plain, scattered = WORKLOADS["many-small"], WORKLOADS["many-small-scattered"]
    assert scattered.shapes == plain.shapes and scattered.scattered_grads
    params, grads = make_tensors(plain, torch.float32)
    params_s, grads_s = make_tensors(scattered, torch.float32)
    for a, b in zip(params + grads, params_s + grads_s, strict=True):
        assert torch.equal(a, b)

    def median_gap(ts: list[torch.Tensor]) -> float:
        return statistics.median(
            abs(ts[i + 1].data_ptr() - ts[i].data_ptr()) for i in range(len(ts) - 1)
        )

    size = 4096 * 4
    assert median_gap(grads_s) > 8 * size  # 15 allocations of their size between two
    assert median_gap(grads) < 2 * size


class FakeClock:
    """time.perf_counter for the round-robin: it moves only when a fake step runs, by that
    step's seconds times the current load, so every ratio is exact. The load changes at probe
    passes: with ``turns`` probes per round, once a round, or at every probe (``turns=1``)."""

    def __init__(self, loads: list[float], turns: int = 1) -> None:
        self.now = 0.0
        self.load = 1.0  # warm-up calls run unloaded
        self.loads = iter(loads)
        self.turns = turns
        self.probes = 0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float, loaded: bool = True) -> Callable[[], None]:
        def run() -> None:
            self.now += seconds * (self.load if loaded else 1.0)

        return run

    def probe(self) -> float:
        """A pass before a call: the machine's load may change, the bandwidth follows (100 GB/s
        idle)."""
        if self.probes % self.turns == 0:
            self.load = next(self.loads)
        self.probes += 1
        return 100.0 / self.load


def test_round_robin_pairs_ratios_within_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine is up to 3x slower in some rounds: raw times spread, per-round ratios do not.
    clock = FakeClock([1.0, 2.0, 1.0, 3.0, 1.5], turns=4)
    monkeypatch.setattr(time, "perf_counter", clock)
    fns = {
        "torch for-loop": clock.step(0.008),
        "torch fused": clock.step(0.004),
        "fused_opt cpp": clock.step(0.002),
        "fused_opt torch": clock.step(0.004, loaded=False),  # does not follow the load
    }
    timing = Timing(warmup=2, min_repeats=5, max_repeats=5, budget_s=0.0)
    rounds = time_rounds(fns, torch.device("cpu"), timing, clock.probe)
    assert rounds.failures == {}
    # One reading before each call, in round order.
    assert rounds.probe_gb_per_s == {
        name: (100.0, 50.0, 100.0, 100.0 / 3, 100.0 / 1.5) for name in fns
    }
    assert {len(s.values) for s in rounds.samples.values()} == {5}

    # 100 MB a step: at 100 GB/s the floor is 1 ms, at a 3x load 3 ms.
    family = {"torch": "torch.optim", "fused_opt": "fused_opt"}
    rows = [
        Result("w", "fp32", "adamw", name, family[name.split()[0]], "cpu", 1, 1, 1, 10**8)
        for name in fns
    ]
    add_paired_ratios(rows, rounds)
    by_name = {r.implementation: r for r in rows}
    assert {n: r.speedup for n, r in by_name.items()} == pytest.approx(
        {"torch for-loop": 0.5, "torch fused": 1.0, "fused_opt cpp": 2.0, "fused_opt torch": 1.5}
    )
    assert {n: r.floor_fraction for n, r in by_name.items()} == pytest.approx(
        {
            "torch for-loop": 0.125,
            "torch fused": 0.25,
            "fused_opt cpp": 0.5,
            "fused_opt torch": 0.375,
        }
    )
    # The floor in ms comes from the median reading (66.7 GB/s in the 1.5x round).
    assert all(r.paired and r.floor_gb_per_s == pytest.approx(100.0 / 1.5) for r in rows)
    assert by_name["fused_opt cpp"].floor_ms == pytest.approx(1.5)
    assert by_name["fused_opt cpp"].median_ms == pytest.approx(3.0)
    # Noise is judged on the per-round ratio, not on the raw times.
    assert by_name["fused_opt cpp"].spread > 0.10 and not by_name["fused_opt cpp"].noisy
    assert by_name["fused_opt torch"].noisy


def test_each_call_is_paired_with_the_probe_just_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The load changes between the calls of one round: a floor from one reading per round
    # would mix loads; each call's own reading keeps every fraction exact.
    loads = [1.0, 3.0, 1.5, 2.0, 1.0, 2.5, 1.0, 3.0, 2.0, 1.0]
    clock = FakeClock(loads)
    monkeypatch.setattr(time, "perf_counter", clock)
    fns = {"torch fused": clock.step(0.004), "fused_opt cpp": clock.step(0.002)}
    timing = Timing(warmup=1, min_repeats=5, max_repeats=5, budget_s=0.0)
    rounds = time_rounds(fns, torch.device("cpu"), timing, clock.probe)
    # Round k starts at the (k % 2)-th function: torch, cpp | cpp, torch | torch, cpp | ...
    assert rounds.probe_gb_per_s["torch fused"] == tuple(
        100.0 / x for x in (1.0, 2.0, 1.0, 3.0, 2.0)
    )
    assert rounds.probe_gb_per_s["fused_opt cpp"] == tuple(
        100.0 / x for x in (3.0, 1.5, 2.5, 1.0, 1.0)
    )
    family = {"torch fused": "torch.optim", "fused_opt cpp": "fused_opt"}
    rows = [Result("w", "fp32", "adamw", n, family[n], "cpu", 1, 1, 1, 10**8) for n in fns]
    add_paired_ratios(rows, rounds)
    # 100 MB: 1 ms at 100 GB/s; the cpp step takes 2 ms at every load, torch's 4 ms.
    fractions = {r.implementation: r.floor_fraction for r in rows}
    assert fractions == pytest.approx({"torch fused": 0.25, "fused_opt cpp": 0.5})
    assert all(r.paired for r in rows)


def test_round_robin_leaves_out_what_raises_and_times_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock([1.0] * 16)  # a probe before each call: 4 rounds of at most 4 calls
    monkeypatch.setattr(time, "perf_counter", clock)
    calls = {"late": 0}

    def broken() -> None:
        raise RuntimeError("no kernel for this dtype")

    def fails_in_round_two() -> None:
        calls["late"] += 1
        if calls["late"] == 3:  # 1 warm-up call, then rounds 1 and 2
            raise RuntimeError("out of memory")
        clock.now += 0.001

    fns = {"a": clock.step(0.002), "broken": broken, "late": fails_in_round_two}
    fns["b"] = clock.step(0.001)
    timing = Timing(warmup=1, min_repeats=4, max_repeats=4, budget_s=0.0)
    rounds = time_rounds(fns, torch.device("cpu"), timing, clock.probe)
    assert set(rounds.failures) == {"broken", "late"}
    assert str(rounds.failures["broken"]) == "no kernel for this dtype"
    assert rounds.samples["a"].values == pytest.approx((0.002,) * 4)
    assert rounds.samples["b"].values == pytest.approx((0.001,) * 4)
    assert set(rounds.samples) == {"a", "b"}


@pytest.mark.parametrize("warm_turns", [False, True])
def test_warm_turns_time_a_second_call_after_the_neighbours_ran(
    monkeypatch: pytest.MonkeyPatch, warm_turns: bool
) -> None:
    # Each step is 10x slower right after the other one ran (its caches were evicted).
    clock = FakeClock([])
    monkeypatch.setattr(time, "perf_counter", clock)
    last = {"ran": None}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            clock.now += 0.001 if last["ran"] == name else 0.010
            last["ran"] = name

        return run

    fns = {"a": step("a"), "b": step("b")}
    timing = Timing(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)
    rounds = time_rounds(fns, torch.device("cpu"), timing, warm_turns=warm_turns)
    for name in fns:
        if warm_turns:
            assert rounds.samples[name].values == pytest.approx((0.001,) * 3)
        else:  # cold whenever the other one ran last
            assert max(rounds.samples[name].values) == pytest.approx(0.010)


def _run_tiny_case(impls: list[Implementation], optimizer: str) -> list[Result]:
    """run_cases on 100 tensors of 16 in fp32 with 3 rounds: seconds, on one thread."""
    return run_cases(
        [Case("tiny-100", "fp32", (optimizer,))],
        impls,
        torch.device("cpu"),
        {"tiny-100": Timing(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)},
        threads=1,
        probe=BandwidthProbe(torch.device("cpu"), 2**16),
    )


def test_run_cases_reports_an_implementation_failing_in_warm_up_and_times_the_others() -> None:
    class Failing(torch.optim.Optimizer):
        def step(self, closure=None) -> None:  # noqa: ANN001
            raise RuntimeError("kernel crashed")

    impls = [i for i in discover(peers=False)[0] if i.family == "torch.optim"]
    impls.append(Implementation("failing", "peer", lambda spec, params: Failing(params, {})))
    rows = _run_tiny_case(impls, "adamw")
    by_name = {r.implementation: r for r in rows}
    assert by_name["failing"].skipped == "failed: RuntimeError: kernel crashed"
    assert by_name["failing"].median_ms is None
    for r in rows[:-1]:
        assert r.skipped is None and r.repeats == 3
        assert r.speedup > 0 and r.floor_fraction > 0
        assert not r.paired  # 100 tensors of 16: far below the size probed per round


class _Idle(torch.optim.Optimizer):
    """A "step" that changes nothing: the fastest step there is, and wrong."""

    def step(self, closure=None) -> None:  # noqa: ANN001
        return None


def test_a_step_that_skips_its_work_is_marked_wrong_and_never_the_reference() -> None:
    impls = [i for i in discover(peers=False)[0] if i.name in ("torch for-loop", "torch foreach")]
    impls.append(Implementation("torch idle", "torch.optim", lambda spec, ps: _Idle(ps, {})))
    rows = _run_tiny_case(impls, "sgd-momentum")
    by_name = {r.implementation: r for r in rows}
    assert by_name["torch idle"].wrong and "relative difference 1.00" in by_name["torch idle"].wrong
    assert by_name["torch for-loop"].wrong is None and by_name["torch foreach"].wrong is None
    # Timed and shown, but the speed-ups are over the fastest mode whose results are right.
    assert by_name["torch idle"].median_ms is not None
    reference = min(
        (by_name["torch for-loop"], by_name["torch foreach"]), key=lambda r: r.median_ms
    )
    assert reference.speedup == pytest.approx(1.0)
    summary = summary_table(rows)
    assert f"({reference.implementation[6:]})" in summary and "(idle)" not in summary
    (note,) = wrong_result_notes(rows)
    assert note.startswith("torch idle, sgd-momentum fp32: wrong results")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_fused_opt_backend_passes_the_benchmarks_results_check(
    optimizer: str, dtype: str
) -> None:
    impls = discover(peers=False)[0]
    assert any(i.family == "fused_opt" for i in impls)
    wrong = wrong_results(impls, OPTIMIZERS[optimizer], DTYPES[dtype], torch.device("cpu"))
    assert {name: why for name, why in wrong.items() if name.startswith("fused_opt")} == {}


def test_time_calls_warms_up_then_samples_within_the_limits() -> None:
    calls = []
    samples = time_calls(
        lambda: calls.append(1),
        torch.device("cpu"),
        Timing(warmup=2, min_repeats=4, max_repeats=6, budget_s=10.0),
    )
    assert len(samples.values) == 6  # the budget is not spent before max_repeats
    assert len(calls) == 2 + 6


def test_time_calls_stops_a_pathologically_slow_case_after_three_samples() -> None:
    timing = Timing(warmup=0, min_repeats=10, max_repeats=50, budget_s=0.0, limit_s=0.0)
    assert len(time_calls(lambda: None, torch.device("cpu"), timing).values) == 3


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
