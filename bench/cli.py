"""`python -m bench` (`make bench`): fused_opt against torch.optim on this machine.

Modes: default (< 5 min on 2 cores), --quick (< 1 min), --full (more sizes, dtypes and thread
counts). Progress goes to stderr; the table to stdout; JSON, Markdown and a PNG chart to
bench/runs/<date>_<machine>_<mode>.* (ignored by git; the curated reference results are in
bench/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import report
from .compare import Case, Result, run_cases
from .e2e import LMConfig, run_e2e
from .implementations import discover
from .measure import NOISY_SPREAD, BandwidthProbe, Timing, measure_bandwidth
from .workloads import DTYPES, OPTIMIZERS, WORKLOADS, bytes_per_element

# Ordinary runs: ignored by git. A reference result is copied to bench/results/ by hand.
RESULTS_DIR = Path(__file__).with_name("runs")
MAIN_OPTIMIZERS = ("sgd-momentum", "sgd-nesterov", "adam", "adamw")
SGD_AND_ADAMW = ("sgd-momentum", "adamw")
# The end-to-end loss curves differ only by float rounding; more than this is a real difference.
E2E_LOSS_TOLERANCE = 1e-3
SUMMARY_HEAD = (
    "Summary: median ms (fraction of the floor) speed-up over the fastest torch.optim mode, "
    "the last two paired per round"
)


@dataclass(frozen=True)
class Plan:
    name: str
    cases: tuple[Case, ...]
    timing: dict[str, Timing]  # per workload; "*" for the rest
    threads: tuple[int, ...]
    bandwidth_elements: int
    e2e: LMConfig | None
    bandwidth_timing: Timing | None = None  # None: measure_bandwidth's own

    def timing_for(self) -> dict[str, Timing]:
        return {w: self.timing.get(w, self.timing["*"]) for w in WORKLOADS}


def _cases(spec: dict[str, dict[str, tuple[str, ...]]]) -> tuple[Case, ...]:
    return tuple(Case(w, d, opts) for w, by_dtype in spec.items() for d, opts in by_dtype.items())


def _threads_all() -> int:
    return torch.get_num_threads()


def make_plan(mode: str) -> Plan:
    # The 124M-element GPT-2 steps take 50-500 ms each here: fewer, longer samples.
    big = Timing(warmup=2, min_repeats=5, max_repeats=15, budget_s=1.0)
    small = Timing(warmup=3, min_repeats=10, max_repeats=60, budget_s=0.6)
    if mode == "smoke":
        return Plan(
            "smoke",
            (Case("tiny-100", "fp32", SGD_AND_ADAMW),),
            {"*": Timing(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)},
            (_threads_all(),),
            2**22,
            LMConfig(
                d_model=32, n_layers=1, n_heads=2, context=16, batch=4, steps=4, warmup_steps=1
            ),
            Timing(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0),
        )
    if mode == "quick":
        cases = _cases(
            {
                "many-small": {"fp32": SGD_AND_ADAMW},
                "tiny": {"fp32": SGD_AND_ADAMW},
                "large-4M": {"fp32": SGD_AND_ADAMW, "bf16": ("adamw",)},
            }
        )
        quick = Timing(warmup=2, min_repeats=7, max_repeats=30, budget_s=0.3)
        return Plan(
            "quick",
            cases,
            {"*": quick},
            (_threads_all(),),
            2**25,
            LMConfig(steps=15, warmup_steps=3),
        )
    if mode == "default":
        cases = _cases(
            {
                "gpt2-small": {"fp32": MAIN_OPTIMIZERS, "bf16": SGD_AND_ADAMW},
                "many-small": {"fp32": MAIN_OPTIMIZERS, "bf16": SGD_AND_ADAMW},
                "tiny": {"fp32": MAIN_OPTIMIZERS},
                "large-32M": {"fp32": MAIN_OPTIMIZERS, "bf16": SGD_AND_ADAMW},
            }
        )
        return Plan(
            "default", cases, {"gpt2-small": big, "*": small}, (_threads_all(),), 2**26, LMConfig()
        )
    if mode == "full":
        every = MAIN_OPTIMIZERS + ("sgd",)
        both = {"fp32": every, "bf16": every}
        cases = _cases(
            {
                w: both
                for w in (
                    "gpt2-small",
                    "many-small",
                    "many-small-scattered",
                    "tiny",
                    "large-4M",
                    "large-32M",
                    "large-128M",
                )  # fmt: skip
            }
        )
        threads = tuple(sorted({1, max(1, _threads_all() // 2), _threads_all()}))
        return Plan(
            "full",
            cases,
            {"gpt2-small": big, "large-128M": big, "*": small},
            threads,
            2**27,
            LMConfig(steps=100, warmup_steps=10),
        )
    raise ValueError(mode)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="a glance in under a minute (no GPT-2 set)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="more sizes, both dtypes everywhere, several thread counts",
    )
    mode.add_argument(
        "--smoke", dest="mode", action="store_const", const="smoke", help=argparse.SUPPRESS
    )  # the test suite's seconds-long run
    p.set_defaults(mode="default")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    p.add_argument("--workloads", help=f"comma list among {', '.join(WORKLOADS)}")
    p.add_argument("--optimizers", help=f"comma list among {', '.join(OPTIMIZERS)}")
    p.add_argument("--threads", help="comma list of torch thread counts (CPU)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training run")
    p.add_argument("--no-peers", action="store_true", help="leave DeepSpeed and optimi out")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    return p.parse_args(argv)


def _narrow(plan: Plan, args: argparse.Namespace) -> Plan:
    cases = plan.cases
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = set(wanted) - set(WORKLOADS)
        if unknown:
            sys.exit(f"unknown workload(s): {', '.join(sorted(unknown))}")
        # Named workloads run even if the mode did not include them, with the main optimizers.
        known = {c.workload for c in cases}
        cases = tuple(c for c in cases if c.workload in wanted)
        cases += tuple(Case(w, "fp32", MAIN_OPTIMIZERS) for w in wanted if w not in known)
    if args.optimizers:
        wanted = args.optimizers.split(",")
        unknown = set(wanted) - set(OPTIMIZERS)
        if unknown:
            sys.exit(f"unknown optimizer(s): {', '.join(sorted(unknown))}")
        cases = tuple(replace(c, optimizers=tuple(wanted)) for c in cases)
    threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else plan.threads
    return replace(plan, cases=cases, threads=threads, e2e=None if args.no_e2e else plan.e2e)


def _e2e_optimizers(device: torch.device) -> dict:
    def torch_adamw(**mode):
        return lambda params, cfg: torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, **mode
        )

    factories = {
        "torch.optim.AdamW": torch_adamw(),
        "torch.optim.AdamW fused": torch_adamw(fused=True),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import fused_opt
        except Exception:
            return factories
    for backend in fused_opt.available_backends():
        if backend == "cpp" and device.type != "cpu" or backend == "cuda" and device.type != "cuda":
            continue
        factories[f"fused_opt.AdamW {backend}"] = lambda params, cfg, b=backend: fused_opt.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, backend=b
        )
    return factories


def wrong_result_notes(results: list[Result]) -> list[str]:
    """One note per implementation, optimizer and dtype whose results are wrong."""
    seen = dict.fromkeys(
        (r.implementation, r.optimizer, r.dtype, r.wrong) for r in results if r.wrong
    )
    return [
        f"{impl}, {optimizer} {dtype}: wrong results ('!'): {why}"
        for impl, optimizer, dtype, why in seen
    ]


def _load_note() -> str | None:
    """A note when other processes compete for the cores (the 1-minute load average)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.5 * cores:
        return None
    return (
        f"load average {load:.1f} on {cores} cores when the run started: other processes "
        "compete for the cores, timings are noisy (rerun on an idle machine)"
    )


def _measure_all(
    plan: Plan, impls: list, device: torch.device, notes: list[str]
) -> tuple[list[Result], dict]:
    """Every case at every thread count, each with its own bandwidth readings."""
    results: list[Result] = []
    bandwidths = {}
    default_threads = torch.get_num_threads()
    for threads in plan.threads:
        torch.set_num_threads(threads)
        before = measure_bandwidth(device, plan.bandwidth_elements, plan.bandwidth_timing)
        rates = ", ".join(f"{k} {v:.1f}" for k, v in before.by_pattern.items())
        _progress(f"bandwidth ({threads} threads): {before.gb_per_s:.1f} GB/s (best of {rates})")
        probe = BandwidthProbe(device, plan.bandwidth_elements)
        results += run_cases(plan.cases, impls, device, plan.timing_for(), threads, probe)
        probes, round_probes, probe_kind = probe.rates, probe.round_rates, probe.kind
        references = probe.reference_rates
        del probe  # its buffer: the measurement after the run needs the memory
        after = measure_bandwidth(device, plan.bandwidth_elements, plan.bandwidth_timing)
        seen = [before.gb_per_s, after.gb_per_s, *probes, *round_probes]
        low, high = min(seen), max(seen)
        bandwidths[threads] = {
            "range_gb_per_s": [low, high],
            "before": before.as_dict(),
            "after": after.as_dict(),
            "probes_gb_per_s": probes,
            "round_probes_gb_per_s": round_probes,
            "probe": probe_kind,
            "reference_probes_gb_per_s": references,
        }
        if note := _slow_floor_note(threads, probes, references):
            notes.append(note)
        if (high - low) / high > NOISY_SPREAD:
            notes.append(
                f"memory bandwidth ({threads} threads) varied from {low:.1f} to {high:.1f} GB/s "
                "during the run (other load on the machine); speed-ups are paired per round and "
                "floors per call, so each compares calls made under the same conditions"
            )
    torch.set_num_threads(default_threads)
    return results, bandwidths


def _slow_floor_note(threads: int, probes: list[float], references: list[float]) -> str | None:
    """A note when the floor's pass read slower than torch's ``x *= c`` taken beside it.

    Each reading of the step-shaped pass before a case is paired with one of torch's pass over
    the same memory; where the shaped pass is the slower one, the floors are too long and every
    fraction reads too high.
    """
    if not references:
        return None
    ratios = [p / r for p, r in zip(probes, references, strict=True)]
    median = statistics.median(ratios)
    if median >= 1:
        return None
    slower = sum(r < 1 for r in ratios)
    return (
        f"the floor's pass ({threads} threads) read slower than torch's x *= c beside it in "
        f"{slower} of {len(ratios)} cases (median {median:.2f}x): the "
        "fractions of the floor read too high in this run"
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    plan = _narrow(make_plan(args.mode), args)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if want_cuda else "cpu")
    machine = report.machine(device)
    command = " ".join(["python -m bench", *argv])
    stamp = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()

    impls, notes = discover(peers=not args.no_peers)
    if device.type == "cpu" and (load := _load_note()):
        notes.append(load)
    for note in notes:
        _progress(f"note: {note}")
    _progress(f"machine: {machine}; torch {torch.__version__}; mode {plan.name}")
    results, bandwidths = _measure_all(plan, impls, device, notes)
    notes += wrong_result_notes(results)
    e2e = run_e2e(_e2e_optimizers(device), plan.e2e, device) if plan.e2e else []
    worst = max((e.max_abs_loss_diff for e in e2e), default=0.0)
    if worst > E2E_LOSS_TOLERANCE:
        notes.append(f"end to end: the loss curves differ by up to {worst:.2e} (expected < 1e-3)")
    elapsed = time.perf_counter() - started

    headline = (
        f"{stamp:%Y-%m-%d %H:%M} UTC, {machine}, torch {torch.__version__}, "
        f"`{command}`, {elapsed:.0f} s"
    )
    bandwidth = ", ".join(
        f"{t} threads {b['range_gb_per_s'][0]:.1f} to {b['range_gb_per_s'][1]:.1f} GB/s"
        for t, b in bandwidths.items()
    )
    e2e_head = (
        f"End to end ({e2e[0].params:,} params, {len(e2e[0].losses)} iterations):" if e2e else ""
    )

    print(f"\n{headline}\nmemory bandwidth seen: {bandwidth}\n\n{report.table(results)}")
    print(f"\n{SUMMARY_HEAD}\n\n{report.summary_table(results)}")
    print("", *report.METHOD_NOTES, sep="\n")
    if e2e:
        print(f"\n{e2e_head}\n{report.e2e_table(e2e)}")
    for note in notes:
        print(f"note: {note}")

    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"{stamp:%Y-%m-%d_%H%M}_{report.machine_slug(device)}_{plan.name}"
    payload = {
        "date_utc": stamp.isoformat(timespec="seconds"),
        "machine": machine,
        "device": device.type,
        "torch": torch.__version__,
        "command": command,
        "mode": plan.name,
        "elapsed_s": elapsed,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "bandwidth": bandwidths,
        "bytes_per_element": {
            f"{o}/{d}": bytes_per_element(OPTIMIZERS[o], DTYPES[d])
            for o in OPTIMIZERS
            for d in DTYPES
        },
        "noisy_spread": NOISY_SPREAD,
        "notes": notes,
        "results": [r.as_dict() for r in results],
        "e2e": {
            "config": asdict(plan.e2e) if plan.e2e else None,
            "runs": [e.as_dict() for e in e2e],
        },
    }
    report.write_json(base.with_suffix(".json"), payload)
    md = [
        headline,
        "",
        f"![chart]({base.name}.png)",
        "",
        f"Memory bandwidth seen: {bandwidth}.",
        "",
    ]
    md += [SUMMARY_HEAD, "", report.summary_table(results, markdown=True), ""]
    if e2e:
        md += [e2e_head, "", report.e2e_table(e2e, markdown=True), ""]
    md += [f"- {n}" for n in [*report.METHOD_NOTES, *notes]]
    md += ["", "All results:", "", report.table(results, markdown=True)]
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    title = f"fused_opt vs torch.optim — {machine} — {stamp:%Y-%m-%d}"
    report.write_chart(base.with_suffix(".png"), results, e2e, title)
    _progress(f"\nwrote {base}.json, .md and .png")
    return 0
