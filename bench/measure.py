"""How things are timed: repeated samples and their spread, and the memory bandwidth floor.

CPU and CUDA are timed the same way: synchronise, read the clock, run, synchronise, read the
clock. On CUDA this includes the launch overhead, which is part of what a fused step saves.

Implementations of one case are timed in interleaved rounds (``time_rounds``): each round
calls every implementation once, each call after an optional bandwidth probe pass of its own, so
ratios between implementations, and of each call to the bandwidth just before it, compare calls
made under the same conditions.
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
    "Rounds",
    "Samples",
    "Timing",
    "measure_bandwidth",
    "synchronizer",
    "time_calls",
    "time_rounds",
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
    """How long to measure one case: warm-up calls, then repeats within a time budget.

    With ``time_rounds`` the budget and the limit are per implementation: a round-robin of
    n implementations gets n times as much.
    """

    warmup: int = 3
    min_repeats: int = 7
    max_repeats: int = 50
    budget_s: float = 1.0  # keep sampling until this much time is spent (or max_repeats)
    # A step that is pathologically slow (a machine busy with other jobs) stops sampling here,
    # once it has 3 samples, so the run still ends in its time; its spread will show it.
    limit_s: float = 10.0


@dataclass(frozen=True)
class Samples:
    """Values of one case (seconds per call, or per-round ratios), summarised by median and
    interquartile range."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def iqr(self) -> float:
        if len(self.values) < 4:
            return max(self.values) - min(self.values)
        q1, _, q3 = statistics.quantiles(self.values, n=4)
        return q3 - q1

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr / self.median if self.median > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def _warm_up(fn: Callable[[], object], sync: Callable[[], None], timing: Timing) -> None:
    started = time.perf_counter()
    for i in range(timing.warmup):
        if i >= 1 and time.perf_counter() - started >= timing.limit_s / 2:
            break  # one call has created the state; a pathologically slow case needs no more
        fn()
        sync()


def time_calls(
    fn: Callable[[], object], device: torch.device, timing: Timing = Timing()
) -> Samples:
    """Time ``fn`` after ``timing.warmup`` untimed calls, one sample per call."""
    sync = synchronizer(device)
    _warm_up(fn, sync, timing)
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
class Rounds:
    """What ``time_rounds`` measured: every sample list has one entry per round, in order."""

    samples: dict[str, Samples]  # the functions that ran every round
    # For each of those, the probe's reading right before each of its calls; empty when not probed.
    probe_gb_per_s: dict[str, tuple[float, ...]]
    failures: dict[str, Exception]  # raised in warm-up or in a round: left out of the rounds


def time_rounds(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    timing: Timing = Timing(),
    probe: Callable[[], float] | None = None,
    warm_turns: bool = False,
) -> Rounds:
    """Warm each of ``fns`` up, then time them in rounds, each calling every function once.

    ``probe`` (one bandwidth pass, returning GB/s) runs before each call. A shared machine's
    bandwidth moves within tens of milliseconds (readings 8 ms apart correlate at about 0.7,
    80 ms apart at about 0.4), while a round of slow implementations lasts a second, so each call
    is paired with a reading of its own moment; the pass also leaves every call the same cold
    caches. A function
    that raises is left out from then on (one broken implementation must not sink the others);
    the others finish the round, so their samples stay paired round by round. With
    ``warm_turns`` each turn calls its function twice and times the second call: a case that
    runs from the caches is measured warm, not after its neighbours' traffic evicted it.
    """
    sync = synchronizer(device)
    failures: dict[str, Exception] = {}
    for name, fn in fns.items():
        try:
            _warm_up(fn, sync, timing)
        except Exception as exc:
            failures[name] = exc
    running = [name for name in fns if name not in failures]
    seconds: dict[str, list[float]] = {name: [] for name in running}
    probe_rates: dict[str, list[float]] = {name: [] for name in running}
    budget_s, limit_s = timing.budget_s * len(running), timing.limit_s * len(running)
    rounds = 0
    started = time.perf_counter()
    while running and rounds < timing.max_repeats:
        spent = time.perf_counter() - started
        if rounds >= timing.min_repeats and spent >= budget_s:
            break
        if rounds >= 3 and spent >= limit_s:
            break
        # Start each round at the next function, so none always runs after the same neighbour.
        shift = rounds % len(running)
        for name in running[shift:] + running[:shift]:
            if probe is not None:
                probe_rates[name].append(probe())
            try:
                if warm_turns:
                    fns[name]()
                    sync()
                t0 = time.perf_counter()
                fns[name]()
                sync()
                seconds[name].append(time.perf_counter() - t0)
            except Exception as exc:
                failures[name] = exc
        running = [name for name in running if name not in failures]
        rounds += 1
    return Rounds(
        {name: Samples(tuple(seconds[name])) for name in running},
        {name: tuple(probe_rates[name]) for name in running} if probe is not None else {},
        failures,
    )


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
    A run takes it before and after its cases, as the context of its floors (the best pattern,
    with the range of every pass it saw); the floors themselves come from BandwidthProbe.
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


def _stream_pass() -> Callable[[list[torch.Tensor]], None] | None:
    """fused_opt's own streaming pass (fused_opt._ops.stream_pass), when its CPU kernels load."""
    try:
        from fused_opt import _ops
    except ImportError:
        return None
    return _ops.stream_pass if _ops.native_module("cpp") is not None else None


class BandwidthProbe:
    """The pass each timed call is paired with: memory traffic shaped like the step's own.

    A shared machine's memory bandwidth changes with its neighbours' load, by half and more
    within minutes. Called, it takes a short reading (the median of a few passes) as the run
    does before each case; ``time_one_pass`` is the single pass ``time_rounds`` takes before
    each call, so a result can be compared with the bandwidth of its own moment.

    CPU: ``fused_opt._ops.stream_pass`` over as many arrays of ``elements`` fp32 as the step
    streams (``use_streams``), reading every one and writing back all but one, as a step does,
    with the kernels' own loop and loads ahead but no arithmetic to wait on. The bandwidth a
    pass reaches depends on its shape (2-core Intel Xeon, 256 MB arrays, medians of 7 passes,
    2026-12-04: 62-65 GB/s over one array, 49-50 over two, 53-55 over three, 53-56 over four,
    51-52 over five; torch's ``x *= c`` 48-49), so the floor of a step is read with a pass of its
    own shape. Each reading before a case also times torch's ``x *= c`` over the same arrays
    (``reference_rates``), so a run shows that the pass it calls the floor is not slower than
    torch's own: a floor read with a slower pass would flatter every step.
    Without the compiled kernels: torch's ``x *= c``. CUDA: a device copy.
    """

    def __init__(self, device: torch.device, elements: int = 2**26) -> None:
        self.device = device
        self.elements = elements
        self._gen = torch.Generator().manual_seed(2)
        self._native = _stream_pass() if device.type == "cpu" else None
        self._arrays = [self._new_array()]
        self.out = torch.empty_like(self._arrays[0]) if device.type == "cuda" else None
        self.streams = 1
        self.rates: list[float] = []  # the readings before each case
        self.reference_rates: list[float] = []  # torch's x *= c, beside each of those readings
        self.round_rates: list[float] = []  # the single passes before each timed call

    @property
    def kind(self) -> str:
        """What the pass is, for the report."""
        if self.out is not None:
            return "a device copy"
        if self._native is not None:
            return "fused_opt._ops.stream_pass over the step's streams"
        return "torch's x *= c (the compiled kernels are missing)"

    def _new_array(self) -> torch.Tensor:
        return torch.rand(self.elements, generator=self._gen).to(self.device)

    def use_streams(self, streams: int) -> None:
        """Shape the passes from now on like a step over ``streams`` arrays (CPU, compiled)."""
        if self._native is None:
            return
        while len(self._arrays) < streams:
            self._arrays.append(self._new_array())
        self.streams = streams

    @property
    def bytes_per_pass(self) -> int:
        written = max(self.streams - 1, 1)
        return (self.streams + written) * self._arrays[0].element_size() * self.elements

    def _pass(self) -> None:
        if self.out is not None:
            self.out.copy_(self._arrays[0])
        elif self._native is not None:
            self._native(self._arrays[: self.streams])
        else:
            self._arrays[0].mul_(1.0000001)

    def _reference_pass(self) -> None:
        # Over every array the shaped pass streams, one after another: as much memory as that
        # pass sweeps, so both start from caches as cold. (One array of 128 MB, repeated, reads
        # about 1.7x faster than one of 256 MB on the 2-core VM: the caches hold most of it.)
        for x in self._arrays[: self.streams]:
            x.mul_(1.0000001)

    def __call__(self) -> float:
        samples = time_calls(self._pass, self.device, _PROBE_TIMING)
        rate = self.bytes_per_pass / samples.median / 1e9
        self.rates.append(rate)
        if self._native is not None:
            reference = time_calls(self._reference_pass, self.device, _PROBE_TIMING)
            moved = 2 * self._arrays[0].element_size() * self.elements * self.streams
            self.reference_rates.append(moved / reference.median / 1e9)
        return rate

    def time_one_pass(self) -> float:
        sync = synchronizer(self.device)
        sync()
        t0 = time.perf_counter()
        self._pass()
        sync()
        rate = self.bytes_per_pass / (time.perf_counter() - t0) / 1e9
        self.round_rates.append(rate)
        return rate


_PROBE_TIMING = Timing(warmup=1, min_repeats=5, max_repeats=5, budget_s=0.0)
