"""How things are timed: repeated samples and their spread, and the memory bandwidth floor.

CPU and CUDA are timed the same way: synchronise, read the clock, run, synchronise, read the
clock. On CUDA this includes the launch overhead, which is part of what a fused step saves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "NOISY_SPREAD",
    "BandwidthProbe",
    "Samples",
    "Timing",
    "measure_bandwidth",
    "synchronizer",
    "time_calls",
]

# IQR / median above this: the median is not trusted to compare implementations.
NOISY_SPREAD = 0.10


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for queued work on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Timing:
    """How long to measure one case: warm-up calls, then repeats within a time budget."""

    warmup: int = 3
    min_repeats: int = 7
    max_repeats: int = 50
    budget_s: float = 1.0  # keep sampling until this much time is spent (or max_repeats)
    # A step that is pathologically slow (a machine busy with other jobs) stops sampling here,
    # once it has 3 samples, so the run still ends in its time; its spread will show it.
    limit_s: float = 10.0


@dataclass(frozen=True)
class Samples:
    """Seconds per call of one case, summarised by median and interquartile range."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> float:
        if len(self.seconds) < 4:
            return max(self.seconds) - min(self.seconds)
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return q3 - q1

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr / self.median if self.median > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def time_calls(
    fn: Callable[[], object], device: torch.device, timing: Timing = Timing()
) -> Samples:
    """Time ``fn`` after ``timing.warmup`` untimed calls, one sample per call."""
    sync = synchronizer(device)
    warm_start = time.perf_counter()
    for i in range(timing.warmup):
        if i >= 1 and time.perf_counter() - warm_start >= timing.limit_s / 2:
            break  # one call has created the state; a pathologically slow case needs no more
        fn()
        sync()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < timing.max_repeats:
        spent = time.perf_counter() - started
        if len(samples) >= timing.min_repeats and spent >= timing.budget_s:
            break
        if len(samples) >= 3 and spent >= timing.limit_s:
            break
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return Samples(tuple(samples))


@dataclass(frozen=True)
class Bandwidth:
    """The best median GB/s of simple passes over tensors far larger than the caches."""

    gb_per_s: float
    by_pattern: dict[str, float]  # pattern -> GB/s (median of its samples)
    spread: float  # IQR / median of the best pattern
    elements: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_bandwidth(
    device: torch.device, elements: int = 2**26, timing: Timing | None = None
) -> Bandwidth:
    """Memory bandwidth of the passes an optimizer step is made of.

    CPU: in-place read-modify-write passes with torch's vectorised kernels, reading 1 to 3
    streams and writing 1 of them back (``x *= c``, ``x += y``, ``x += c * y * z``); an optimizer
    step reads 3 to 4 streams and writes 1 to 3 of them in place. CUDA: a device-to-device copy.
    The floor uses the best pattern, so it is the hardest one to beat.
    """
    timing = timing or Timing(warmup=2, min_repeats=7, max_repeats=15, budget_s=0.5)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x, y, z = (torch.rand(elements, generator=gen).to(device) for _ in range(3))
    if device.type == "cuda":
        patterns = {"copy (1R 1W)": (lambda: y.copy_(x), 2)}
    else:
        patterns = {
            "x*=c (1R 1W)": (lambda: x.mul_(1.0000001), 2),
            "x+=y (2R 1W)": (lambda: x.add_(y, alpha=1e-7), 3),
            "x+=c*y*z (3R 1W)": (lambda: x.addcmul_(y, z, value=1e-7), 4),
        }
    rates: dict[str, float] = {}
    spreads: dict[str, float] = {}
    itemsize = x.element_size()
    for name, (fn, streams) in patterns.items():
        samples = time_calls(fn, device, timing)
        rates[name] = streams * itemsize * elements / samples.median / 1e9
        spreads[name] = samples.spread
    best = max(rates, key=rates.__getitem__)
    return Bandwidth(rates[best], rates, spreads[best], elements)


class BandwidthProbe:
    """A short in-place pass (``x *= c``, 256 MB) repeated through the run, before every case.

    A shared machine's memory bandwidth changes with its neighbours' load, by half and more
    within minutes; the floor uses the best rate seen by any measurement of the run, so a busy
    moment cannot make the results look closer to the floor than they are.
    """

    def __init__(self, device: torch.device, elements: int = 2**26) -> None:
        self.device = device
        self.x = torch.rand(elements, generator=torch.Generator().manual_seed(2)).to(device)
        self.rates: list[float] = []

    def __call__(self) -> float:
        if self.device.type == "cuda":
            out = torch.empty_like(self.x)
            samples = time_calls(lambda: out.copy_(self.x), self.device, _PROBE_TIMING)
        else:
            samples = time_calls(lambda: self.x.mul_(1.0000001), self.device, _PROBE_TIMING)
        rate = 2 * self.x.element_size() * self.x.numel() / samples.median / 1e9
        self.rates.append(rate)
        return rate


_PROBE_TIMING = Timing(warmup=1, min_repeats=5, max_repeats=5, budget_s=0.0)
