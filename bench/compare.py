"""The side-by-side comparison: every (workload, dtype, optimizer) case x every implementation.

Memory stays bounded: one param and grad set is alive per (workload, dtype), and one
optimizer's state at a time (GPT-2 small in fp32 with Adam: 0.5 GB params + 0.5 GB grads +
1 GB state, plus what a foreach implementation allocates as temporaries).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from .implementations import Implementation
from .measure import Timing, time_calls
from .workloads import DTYPES, OPTIMIZERS, WORKLOADS, bytes_per_element, make_tensors

__all__ = ["Case", "Result", "add_floor", "add_speedups", "run_cases"]


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
    floor_ms: float | None = None
    floor_fraction: float | None = None  # floor time / measured time (1.0 = at bandwidth)
    us_per_tensor: float | None = None
    speedup: float | None = None  # over the fastest torch.optim mode of the same case
    noisy: bool = False  # its spread, or the reference's, is too large to trust the ratio
    skipped: str | None = None

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
    before_each: Callable[[], object] = lambda: None,
) -> list[Result]:
    """Time every implementation on every case; ``timing`` maps workload names to settings.

    ``before_each`` runs before each (workload, dtype, optimizer) group (a bandwidth probe).
    """
    cases = list(cases)
    total = sum(len(c.optimizers) for c in cases) * len(impls)
    done = 0
    started = time.perf_counter()
    results: list[Result] = []
    broken: dict[str, str] = {}
    for case in cases:
        workload, dtype = WORKLOADS[case.workload], DTYPES[case.dtype]
        params, grads = make_tensors(workload, dtype, device)
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(True)
            p.grad = g
        for opt_name in case.optimizers:
            before_each()
            spec = OPTIMIZERS[opt_name]
            nbytes = bytes_per_element(spec, dtype) * workload.elements
            for impl in impls:
                done += 1
                result = Result(
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
                results.append(result)
                result.skipped = broken.get(impl.name) or impl.unsupported(spec, dtype, device)
                if result.skipped is None:
                    try:
                        optimizer = impl.build(spec, params)
                        samples = time_calls(optimizer.step, device, timing[case.workload])
                    except Exception as exc:  # report and go on: one peer must not sink the run
                        result.skipped = f"failed: {type(exc).__name__}: {exc}"[:200]
                        if impl.family == "peer":  # e.g. a JIT build that fails: try it once
                            broken[impl.name] = f"failed earlier: {type(exc).__name__}"
                    else:
                        _fill(result, samples.median, samples.iqr, len(samples.seconds))
                    finally:
                        optimizer = None
                        _release()
                _progress(_progress_line(done, total, started, result))
        del params, grads
        _release()
    return results


def _fill(result: Result, median: float, iqr: float, repeats: int) -> None:
    result.median_ms = median * 1e3
    result.iqr_ms = iqr * 1e3
    result.spread = iqr / median
    result.repeats = repeats
    result.gb_per_s = result.bytes_per_step / median / 1e9
    result.us_per_tensor = median * 1e6 / result.tensors


def add_floor(results: list[Result], gb_per_s: float) -> None:
    """Floor time (bytes / bandwidth) and the fraction of it achieved (1.0: at bandwidth)."""
    for r in results:
        r.floor_ms = r.bytes_per_step / (gb_per_s * 1e9) * 1e3
        if r.median_ms is not None:
            r.floor_fraction = r.floor_ms / r.median_ms


def _progress_line(done: int, total: int, started: float, r: Result) -> str:
    head = f"[{done:>3}/{total}] {time.perf_counter() - started:6.1f}s  "
    head += f"{r.workload:<12} {r.dtype:<4} {r.optimizer:<12} {r.implementation:<18}"
    if r.median_ms is None:
        return f"{head} skipped: {r.skipped}"
    return (
        f"{head} {r.median_ms:9.3f} ms  ±{100 * (r.spread or 0):3.0f}%  "
        f"{r.gb_per_s:6.1f} GB/s  {r.us_per_tensor:8.2f} us/tensor"
    )


def add_speedups(results: list[Result], noisy_spread: float) -> None:
    """Speed-up of each result over the fastest torch.optim mode of its case, with a noise flag."""
    cases: dict[tuple, list[Result]] = {}
    for r in results:
        if r.median_ms is not None:
            cases.setdefault((r.workload, r.dtype, r.optimizer, r.device, r.threads), []).append(r)
    for rows in cases.values():
        torch_rows = [r for r in rows if r.family == "torch.optim"]
        if not torch_rows:
            continue
        best = min(torch_rows, key=lambda r: r.median_ms)
        for r in rows:
            r.speedup = best.median_ms / r.median_ms
            r.noisy = max(r.spread or 0, best.spread or 0) > noisy_spread
