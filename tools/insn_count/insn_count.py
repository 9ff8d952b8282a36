"""Instructions per element of each SIMD variant's kernels, counted under qemu user-mode
emulation: on a machine of another arch (aarch64 here) speed cannot be measured, but the
instructions each element costs can, exactly, and they say where a kernel is compute-bound.

    python tools/insn_count/insn_count.py [--arch aarch64|x86_64] [--variants neon,sve256]

For each variant: driver.cpp linked statically with kernels_<variant>.o (built with setup.py's
flags for it), run once per case on N1 and N2 elements under `qemu -d in_asm,exec,nochain`, with
the call and without it; every executed translation block's instruction count is summed, and
the kernel's difference over N2 - N1 elements (fixed costs such as process start-up cancel) is
the count per element.
Prints a markdown table (docs/CPU_KERNELS.md shows it).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = [("adamw", "fp32"), ("adamw", "bf16"), ("adamw", "fp16"), ("sgd", "fp32"), ("sgd", "bf16")]
N1, N2 = 4096, 4096 + 8192  # multiples of every unroll: no tail in the difference
ARCHS = {
    # compiler, qemu, the qemu CPU for a variant (SVE at its vector length, in bytes)
    "aarch64": ("aarch64-linux-gnu-g++", "qemu-aarch64",
                lambda v: f"max,sve-default-vector-length={int(v[3:]) // 8}"
                if v.startswith("sve") else "max"),
    "x86_64": ("g++", "qemu-x86_64", lambda v: "max"),
}  # fmt: skip
TABLES = {"baseline": "kBaselineKernels", "avx2": "kAvx2Kernels", "neon": "kNeonKernels",
          "neonbf16": "kNeonBf16Kernels", "sve128": "kSve128Kernels",
          "sve256": "kSve256Kernels"}  # fmt: skip


def setup_module():
    spec = importlib.util.spec_from_file_location("fused_opt_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(setup, variant: str, cxx: str, work: Path) -> Path:  # noqa: ANN001
    flags = setup.CPU_KERNEL_FLAGS + setup.CPU_ISA_FLAGS.get(variant, [])
    obj = work / f"kernels_{variant}.o"
    subprocess.run([cxx, *flags, "-c", str(REPO / f"csrc/cpu/kernels_{variant}.cpp"), "-o", obj],
                   check=True)  # fmt: skip
    exe = work / f"driver_{variant}"
    subprocess.run([cxx, "-O2", "-std=c++17", "-static", f"-DVARIANT_TABLE={TABLES[variant]}",
                    f"-DFUSED_OPT_HAVE_{variant.upper()}=1",
                    str(Path(__file__).with_name("driver.cpp")), str(obj), "-o", exe],
                   check=True)  # fmt: skip
    return exe


def executed(qemu: str, cpu: str, exe: Path, args: list[str], log: Path) -> int:
    """Guest instructions the run executed: each translation block's size (in_asm) times the
    times it ran (exec, with chaining off so that every run is logged)."""
    subprocess.run([qemu, "-cpu", cpu, "-d", "in_asm,exec,nochain", "-D", str(log), str(exe),
                    *args], check=True, capture_output=True)  # fmt: skip
    sizes: dict[int, int] = {}
    runs: collections.Counter[int] = collections.Counter()
    block = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("IN:"):
            block = None
        elif (match := re.match(r"0x([0-9a-f]+):\s", line)) is not None:
            pc = int(match.group(1), 16)
            if block is None:
                block = pc
                sizes[block] = 0
            sizes[block] += 1
        elif (match := re.match(r"Trace \d+: \S+ \[[0-9a-f]+/([0-9a-f]+)/", line)) is not None:
            runs[int(match.group(1), 16)] += 1
            block = None
        else:
            block = None if not line.strip() else block
    return sum(sizes.get(pc, 0) * count for pc, count in runs.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="aarch64", choices=sorted(ARCHS))
    parser.add_argument("--variants", help="comma-separated (default: the arch's, and baseline)")
    args = parser.parse_args()
    cxx, qemu, cpu_of = ARCHS[args.arch]
    setup = setup_module()
    known = setup.AARCH64_ISAS if args.arch == "aarch64" else ("avx2",)  # qemu lacks AVX-512
    variants = args.variants.split(",") if args.variants else ["baseline", *known]
    print(f"| variant | {' | '.join(f'{op} {dtype}' for op, dtype in CASES)} |")
    print(f"|---|{'---|' * len(CASES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in variants:
            exe = build(setup, variant, cxx, work)
            counts = []
            for op, dtype in CASES:
                # The kernel's instructions: those of a run with the call, less those of one
                # without it, on N2 elements less on N1.
                total = sum(
                    sign * executed(qemu, cpu_of(variant), exe, [what, dtype, str(n)], work / "log")
                    for what, sign_of_op in ((op, 1), ("none", -1))
                    for n, sign in ((N2, sign_of_op), (N1, -sign_of_op))
                )
                counts.append(f"{total / (N2 - N1):.2f}")
            print(f"| {variant} | {' | '.join(counts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
