"""The side-by-side comparison: every (workload, dtype, optimizer) case x every implementation.

The implementations of a case are timed together, in interleaved rounds (``time_rounds``), so
each speed-up and each fraction of the bandwidth floor is a median of per-round ratios: calls
made a few milliseconds apart, under the same load from the machine's other tenants.

Memory: one param and grad set is alive per (workload, dtype), and every implementation's
optimizer state of one case (GPT-2 small in fp32 with Adam: 0.5 GB params + 0.5 GB grads + 1 GB
state per implementation, plus what a foreach implementation allocates as temporaries).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from .correctness import wrong_results
from .implementations import Implementation
from .measure import BandwidthProbe, Rounds, Samples, Timing, time_rounds
from .workloads import (
    DTYPES,
    OPTIMIZERS,
    WORKLOADS,
    bytes_per_element,
    make_tensors,
    streams_of,
)

__all__ = [
    "PAIRED_FLOOR_BYTES",
    "Case",
    "Result",
    "add_paired_ratios",
    "fastest_torch_optim",
    "run_cases",
]

# A case that moves at least this much per step streams it from memory (the L3 caches of the
# machines we run on hold 32 MB or less), so each timed call is paired with a bandwidth probe.
# Smaller cases run from the caches or are overhead-bound: a probe would only evict their data.
PAIRED_FLOOR_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Case:
    """Which workload, in which dtype, with which optimizers."""

    workload: str
    dtype: str
    optimizers: tuple[str, ...]


@dataclass
class Result:
    workload: str
    dtype: str
    optimizer: str
    implementation: str
    family: str
    device: str
    threads: int
    tensors: int
    elements: int
    bytes_per_step: int
    median_ms: float | None = None
    iqr_ms: float | None = None
    spread: float | None = None  # IQR / median
    repeats: int = 0
    gb_per_s: float | None = None
    floor_gb_per_s: float | None = None  # the bandwidth the floor is computed from
    paired: bool = False  # floor from the probe before each call (else: the run's readings)
    floor_ms: float | None = None  # bytes / floor_gb_per_s
    floor_fraction: float | None = None  # floor time / measured time (1.0 = at bandwidth)
    us_per_tensor: float | None = None
    speedup: float | None = None  # over the fastest torch.optim mode of the same case
    noisy: bool = False  # the per-round speed-ups spread too much to trust their median
    skipped: str | None = None
    wrong: str | None = None  # why its results differ from torch.optim's (correctness.py)

    def as_dict(self) -> dict:
        return asdict(self)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cases(
    cases: Iterable[Case],
    impls: list[Implementation],
    device: torch.device,
    timing: dict[str, Timing],
    threads: int,
    probe: BandwidthProbe,
) -> list[Result]:
    """Time every implementation on every case; ``timing`` maps workload names to settings.

    ``probe``, shaped like each case's step, takes a reading before each (workload, dtype,
    optimizer) case, and one pass before each timed call in cases that move
    ``PAIRED_FLOOR_BYTES`` or more; the other cases'
    floor uses the median of the readings before each case.
    """
    cases = list(cases)
    total = sum(len(c.optimizers) for c in cases) * len(impls)
    done = 0
    started = time.perf_counter()
    results: list[Result] = []
    broken: dict[str, str] = {}
    checked: dict[tuple[str, str], dict[str, str]] = {}  # (optimizer, dtype) -> wrong results
    for case in cases:
        workload, dtype = WORKLOADS[case.workload], DTYPES[case.dtype]
        params, grads = make_tensors(workload, dtype, device)
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(True)
            p.grad = g
        for opt_name in case.optimizers:
            spec = OPTIMIZERS[opt_name]
            probe.use_streams(streams_of(spec))
            probe()
            if (opt_name, case.dtype) not in checked:
                checked[opt_name, case.dtype] = wrong_results(impls, spec, dtype, device)
            wrong = checked[opt_name, case.dtype]
            nbytes = bytes_per_element(spec, dtype) * workload.elements
            rows = [
                Result(
                    case.workload,
                    case.dtype,
                    opt_name,
                    impl.name,
                    impl.family,
                    device.type,
                    threads,
                    workload.tensors,
                    workload.elements,
                    nbytes,
                )
                for impl in impls
            ]
            steps = {}
            for impl, result in zip(impls, rows, strict=True):
                result.wrong = wrong.get(impl.name)
                result.skipped = broken.get(impl.name) or impl.unsupported(spec, dtype, device)
                if result.skipped is None:
                    try:
                        steps[impl.name] = impl.build(spec, params).step
                    except Exception as exc:  # report and go on: one peer must not sink the run
                        _fail(result, exc, broken)
            paired = nbytes >= PAIRED_FLOOR_BYTES
            rounds = time_rounds(
                steps,
                device,
                timing[case.workload],
                probe.time_one_pass if paired else None,
                warm_turns=not paired,
            )
            for result in rows:
                if result.implementation in rounds.failures:
                    _fail(result, rounds.failures[result.implementation], broken)
            add_paired_ratios(rows, rounds)
            results += rows
            for result in rows:
                done += 1
                _progress(_progress_line(done, total, started, result))
            del steps, rounds
            _release()
        del params, grads
        _release()
    unpaired = [r for r in results if not r.paired]
    if unpaired:
        _set_floor(unpaired, statistics.median(probe.rates))
        for r in unpaired:
            if r.median_ms is not None:
                r.floor_fraction = r.floor_ms / r.median_ms
    return results


def _set_floor(rows: list[Result], gb_per_s: float) -> None:
    for r in rows:
        r.floor_gb_per_s = gb_per_s
        r.floor_ms = r.bytes_per_step / (gb_per_s * 1e9) * 1e3


def _fail(result: Result, exc: Exception, broken: dict[str, str]) -> None:
    result.skipped = f"failed: {type(exc).__name__}: {exc}"[:200]
    if result.family == "peer":  # e.g. a JIT build that fails: try it once
        broken[result.implementation] = f"failed earlier: {type(exc).__name__}"


def add_paired_ratios(rows: list[Result], rounds: Rounds) -> None:
    """Times, floors and speed-ups of one case's ``rows`` from the rounds they ran in together.

    Speed-up: median over rounds of (the reference's time / this time), the reference being the
    torch.optim mode with the lowest median time among those whose results are right. Fraction
    of the floor (when the calls were probed): median over rounds of (bytes / the bandwidth read
    right before the call) / its time; the floor in ms uses the median of all the case's readings.
    """
    timed = [r for r in rows if r.implementation in rounds.samples]
    for r in timed:
        samples = rounds.samples[r.implementation]
        r.median_ms = samples.median * 1e3
        r.iqr_ms = samples.iqr * 1e3
        r.spread = samples.spread
        r.repeats = len(samples.values)
        r.gb_per_s = r.bytes_per_step / samples.median / 1e9
        r.us_per_tensor = samples.median * 1e6 / r.tensors
    if rounds.probe_gb_per_s:
        readings = [gb for name in rounds.samples for gb in rounds.probe_gb_per_s[name]]
        _set_floor(rows, statistics.median(readings))
        for r in rows:
            r.paired = True
        for r in timed:
            r.floor_fraction = _per_round_ratios(
                [
                    r.bytes_per_step / (gb_per_s * 1e9)
                    for gb_per_s in rounds.probe_gb_per_s[r.implementation]
                ],
                rounds.samples[r.implementation].values,
            ).median
    reference_row = fastest_torch_optim(timed)
    if reference_row is None:
        return
    reference = rounds.samples[reference_row.implementation]
    for r in timed:
        speedups = _per_round_ratios(reference.values, rounds.samples[r.implementation].values)
        r.speedup = speedups.median
        r.noisy = speedups.noisy


def fastest_torch_optim(rows: Sequence[Result]) -> Result | None:
    """The timed torch.optim row with the lowest median among those whose results are right."""
    right = [
        r for r in rows if r.family == "torch.optim" and r.median_ms is not None and r.wrong is None
    ]
    return min(right, key=lambda r: r.median_ms) if right else None


def _per_round_ratios(numerators: Sequence[float], seconds: Sequence[float]) -> Samples:
    """The per-round ratios numerator / seconds (their median and spread are what is reported)."""
    return Samples(tuple(n / t for n, t in zip(numerators, seconds, strict=True)))


def _progress_line(done: int, total: int, started: float, r: Result) -> str:
    head = f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f}s  "
    head += f"{r.workload:<12} {r.dtype:<4} {r.optimizer:<12} {r.implementation:<18}"
    if r.median_ms is None:
        return f"{head} skipped: {r.skipped}"
    return (
        f"{head} {r.median_ms:9.3f} ms  ±{100 * (r.spread or 0):3.0f}%  "
        f"{r.gb_per_s:6.1f} GB/s  {r.us_per_tensor:8.2f} us/tensor"
    )
