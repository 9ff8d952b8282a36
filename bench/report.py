"""Where results go: the printed table, a Markdown copy, JSON, and the PNG chart."""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .compare import PAIRED_FLOOR_BYTES, Result, fastest_torch_optim
from .correctness import REFERENCE
from .e2e import E2EResult
from .measure import NOISY_SPREAD

__all__ = ["machine", "machine_slug", "table", "write_json", "write_chart"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """The machine in words, without its host name: the GPU, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{_cpu_model()}, {cores} cores ({isa})"


def machine_slug(device: torch.device) -> str:
    words = machine(device).split(" (")[0]  # the ISA in brackets is in the JSON, not the name
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")


COLUMNS = (
    "workload",
    "dtype",
    "optimizer",
    "implementation",
    "median ms",
    "IQR",
    "GB/s",
    "floor GB/s",
    "floor",
    "us/tensor",
    "speed-up",
)


def _name(r: Result) -> str:
    return r.implementation + (" !" if r.wrong else "")


def _row(r: Result, threads_col: bool) -> list[str]:
    head = [r.workload, r.dtype, r.optimizer, _name(r)]
    if threads_col:
        head.append(str(r.threads))
    if r.median_ms is None:
        return head + ["-"] * 6 + [f"skipped: {r.skipped}"]
    speedup = "" if r.speedup is None else f"{r.speedup:.2f}x" + (" ~" if r.noisy else "")
    return head + [
        f"{r.median_ms:.3f}",
        f"±{100 * (r.spread or 0):.0f}%",
        f"{r.gb_per_s:.1f}",
        f"{r.floor_gb_per_s:.1f}" + ("" if r.paired else " (run)"),
        f"{100 * (r.floor_fraction or 0):.0f}%",
        f"{r.us_per_tensor:.2f}",
        speedup,
    ]


def _layout(columns: list[str], rows: list[list[str]], markdown: bool, breaks: set[int]) -> str:
    """Aligned plain text (a blank line before each row index in ``breaks``) or Markdown."""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(columns)]
    for i, row in enumerate(rows):
        lines += [""] * (i in breaks) + [line(row)]
    return "\n".join(lines)


def table(results: Sequence[Result], markdown: bool = False) -> str:
    """The comparison table; '~' marks a speed-up whose spread is too large to trust, '!' an
    implementation whose results are wrong."""
    threads_col = len({r.threads for r in results}) > 1
    columns = list(COLUMNS)
    if threads_col:
        columns.insert(4, "threads")
    keys = [(r.workload, r.dtype, r.optimizer, r.threads) for r in results]
    breaks = {i for i in range(1, len(keys)) if keys[i] != keys[i - 1]}
    return _layout(columns, [_row(r, threads_col) for r in results], markdown, breaks)


def summary_table(results: Sequence[Result], markdown: bool = False) -> str:
    """One row per case: the floor, the fastest torch.optim mode, then every other implementation
    as 'ms (fraction of floor) speed-up'."""
    cases: dict[tuple, list[Result]] = {}
    for r in results:
        if r.median_ms is not None:
            cases.setdefault((r.workload, r.dtype, r.optimizer, r.threads), []).append(r)
    others = list(dict.fromkeys(r.implementation for r in results if r.family != "torch.optim"))
    threads_col = len({key[3] for key in cases}) > 1
    columns = ["workload", "dtype", "optimizer"] + ["threads"] * threads_col
    columns += ["floor ms", "best torch.optim", *others]
    rows = []
    for (workload, dtype, optimizer, threads), rs in cases.items():
        best = fastest_torch_optim(rs)
        if best is None:
            continue
        row = [workload, dtype, optimizer] + [str(threads)] * threads_col
        row += [f"{best.floor_ms:.3f}", f"{best.median_ms:.3f} ({best.implementation[6:]})"]
        for name in others:
            r = next((r for r in rs if r.implementation == name), None)
            row.append(
                "-"
                if r is None
                else f"{r.median_ms:.3f} ({100 * r.floor_fraction:.0f}%) "
                f"{r.speedup:.2f}x{' ~' if r.noisy else ''}{' !' if r.wrong else ''}"
            )
        rows.append(row)
    return _layout(columns, rows, markdown, set())


def e2e_table(results: Sequence[E2EResult], markdown: bool = False) -> str:
    columns = [
        "implementation",
        "ms/iteration",
        "IQR",
        "step ms",
        "step share",
        "max abs loss diff",
    ]
    rows = [
        [
            e.implementation,
            f"{e.iteration_ms:.2f}",
            f"±{100 * e.spread:.0f}%",
            f"{e.step_ms:.3f}",
            f"{100 * e.step_share:.1f}%",
            f"{e.max_abs_loss_diff:.2e}",
        ]
        for e in results
    ]
    return _layout(columns, rows, markdown, set())


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


# ---- the chart -----------------------------------------------------------------------------
def _bar_panel(ax, rows: list[Result], value: str, ylabel: str, title: str) -> None:  # noqa: ANN001
    groups = list(dict.fromkeys((r.dtype, r.optimizer) for r in rows))
    impls = list(dict.fromkeys(r.implementation for r in rows))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, group in enumerate(groups):
            for r in rows:
                if (r.dtype, r.optimizer) == group and r.implementation == impl:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(getattr(r, value))
        ax.bar(xs, ys, width, label=impl, color=_color(impl))
    ax.set_xticks(range(len(groups)), [f"{o}\n{d}" for d, o in groups], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _color(impl: str) -> str:
    palette = {
        "torch for-loop": "#c7c7c7",
        "torch foreach": "#8c8c8c",
        "torch fused": "#404040",
        "fused_opt cpp": "#d62728",
        "fused_opt cuda": "#d62728",
        "fused_opt torch": "#ff9896",
        "DeepSpeed CPUAdam": "#1f77b4",
        "optimi foreach": "#2ca02c",
    }
    return palette.get(impl, "#9467bd")


def write_chart(
    path: Path, results: Sequence[Result], e2e: Sequence[E2EResult], title: str
) -> None:
    """One PNG: per workload the fraction of the floor (tiny: µs per tensor), then end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(r.threads for r in results) if results else 0
    timed = [r for r in results if r.median_ms is not None and r.threads == threads]
    workloads = list(dict.fromkeys(r.workload for r in timed))
    panels = len(workloads) + (2 if e2e else 0)
    cols = min(3, panels) or 1
    rows_n = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
    flat = list(axes.flat)
    for ax, workload in zip(flat, workloads, strict=False):
        rows = [r for r in timed if r.workload == workload]
        if workload.startswith("tiny"):
            _bar_panel(
                ax,
                rows,
                "us_per_tensor",
                "µs per tensor per step (lower is better)",
                f"{workload}: per-step overhead",
            )
            ax.set_yscale("log")
        else:
            _bar_panel(
                ax,
                rows,
                "floor_fraction",
                "fraction of the bandwidth floor",
                f"{workload} ({rows[0].elements / 1e6:.1f}M elements)",
            )
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
    if timed:  # one legend for every panel, above them all, where it covers no bar
        handles, labels = flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                   bbox_to_anchor=(0.5, 0.97), frameon=False)  # fmt: skip
    if e2e:
        ax_time, ax_loss = flat[len(workloads)], flat[len(workloads) + 1]
        names = [e.implementation for e in e2e]
        steps = [e.step_ms for e in e2e]
        rest = [e.iteration_ms - e.step_ms for e in e2e]
        ax_time.barh(names, rest, color="#aec7e8", label="forward + backward")
        ax_time.barh(names, steps, left=rest, color="#d62728", label="optimizer step")
        ax_time.set_xlabel("ms per training iteration (median)")
        ax_time.set_title(f"end to end: TinyGPT ({e2e[0].params / 1e6:.2f}M params)", fontsize=9)
        ax_time.invert_yaxis()  # the reference (torch.optim.AdamW) on top
        ax_time.legend(fontsize=7)
        ax_time.tick_params(axis="y", labelsize=7)
        for i, e in enumerate(e2e):  # the curves lie on top of each other: vary the dashes
            style = ("-", "--", ":", "-.")[i % 4]
            ax_loss.plot(range(1, len(e.losses) + 1), e.losses, style, label=e.implementation)
        worst = max(e.max_abs_loss_diff for e in e2e)
        ax_loss.set_title(f"training loss (max |difference| {worst:.1e})", fontsize=9)
        ax_loss.set_xlabel("iteration")
        ax_loss.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    head_inches = 0.4 if timed else 0.25  # the title, and the legend under it
    fig.tight_layout(rect=(0, 0, 1, 1 - head_inches / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


METHOD_NOTES = (
    "The implementations of a case are timed in interleaved rounds, each calling every one once. "
    "Fraction of the floor: bytes that must move / bandwidth of an in-place pass shaped like the "
    "step (as many arrays, each read and all but one written back: fused_opt._ops.stream_pass; "
    "torch's x *= c without the compiled kernels; CUDA: a device copy) taken right before each "
    "timed call, median over rounds; cases "
    f"that move less than {PAIRED_FLOOR_BYTES // 2**20} MB a step run from the caches: no pass "
    "(their floor uses the median of the passes before each case, '(run)'), and each turn times "
    "the second of two calls, so they are measured warm. Speed-up: "
    "median over rounds of the per-round ratio (the fastest torch.optim mode's time / this time).",
    f"'~': the per-round speed-ups spread by more than {100 * NOISY_SPREAD:.0f}% of their median "
    "(IQR); the speed-up is not to be trusted.",
    f"'!': wrong results: stepped from the same start with the same grads, its params moved "
    f"unlike {REFERENCE}'s (see the notes); its time is shown, but it is never the reference of "
    "a speed-up ('best torch.optim' is the fastest mode whose results are right).",
)
