#!/usr/bin/env bash
# The one-shot GPU check (`make gpu-check`): run on a fresh copy of the repo on a GPU machine,
# it builds the CUDA kernels for that GPU, runs every CUDA test, runs compute-sanitizer over a
# step of every op and dtype, and benchmarks against torch.optim, then writes one results file
# (markdown + json, named with the date and the GPU) and its logs (one .tar.gz). Without a GPU it
# gets as far as it can and says what it skipped.
#
# Made for the lent GPU machine (Python 3.12, torch 2.11+cu130, nvcc 13, 16 cores, no package
# registry): nothing is installed, the build goes in place (`setup.py build_ext --inplace`)
# and the checks import the package from this tree. Within GPU_CHECK_SECONDS (default 470) of
# wall time: each step's limit shrinks to what is left, and a step with no time left is skipped.
#
#   OUT       where the results go (the device tool sets it); default bench/runs/
#   PYTHON    the interpreter (default: python3)
#   MAX_JOBS  compile jobs (default 16)
#   WHEEL     a CUDA wheel to check instead of building (default: the one
#             tools/check_cuda_build.sh left in build/cuda-check/wheelhouse/, if any; carry it
#             to the GPU machine). It is installed with --no-deps into a scratch directory and
#             everything below runs from a copy of tests/, bench/ and tools/ outside the source
#             tree: the proof that a wheel built elsewhere works on this node. WHEEL=none builds.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"  # absolute: the wheel check moves
RESULTS="${OUT:-$ROOT/bench/runs}"
mkdir -p "$RESULTS"
START=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-470}"
STEPS="$(mktemp)"  # one line per step: name<TAB>status<TAB>seconds<TAB>note
LOGS="$(mktemp -d)"  # every step's log, packed into one file at the end (the device tool
                     # brings back at most 8 files)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((BUDGET - ($(date +%s) - START))); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; echo "gpu_check: $1: $2 ($3 s) $4"; }

# run NAME LIMIT LOG COMMAND...: the command under `timeout`, its output in LOG, one record.
run() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local remaining
  remaining=$(left)
  if ((remaining < 20)); then
    record "$name" skipped 0 "no time left of the ${BUDGET} s"
    return 1
  fi
  ((limit > remaining)) && limit=$remaining
  local t0=$(date +%s) status=0
  # SIGINT first: pytest then still writes its report, the bench its tables so far.
  timeout -s INT -k 15 "$limit" "$@" >"$log" 2>&1 || status=$?
  local took=$(($(date +%s) - t0))
  if ((status == 0)); then
    record "$name" ok "$took" ""
  elif ((status == 124)); then
    record "$name" timeout "$took" "stopped at its ${limit} s limit; see $(basename "$log")"
  else
    record "$name" failed "$took" "exit $status; see $(basename "$log")"
  fi
  return $status
}

HAVE_GPU=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
CUDA_TORCH=$("$PYTHON" -c 'import torch; print(int(bool(torch.version.cuda)))' 2>/dev/null || echo 0)
if ((HAVE_GPU)); then
  GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
  ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
else
  GPU="no GPU"
  ARCH=""
fi
SLUG=$(echo "$GPU" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
STAMP="$(date -u +%Y-%m-%d_%H%M)_${SLUG}_gpu-check"
echo "gpu_check: $GPU (sm ${ARCH:-none}), $("$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")')"

# 1. The wheel, installed, or the build: the CUDA kernels for this GPU only, in place.
if [[ -z "${WHEEL:-}" ]]; then
  WHEEL=$(ls "$ROOT"/build/cuda-check/wheelhouse/fused_opt-*+cu*.whl 2>/dev/null | head -1 || true)
fi
[[ "${WHEEL:-}" == none ]] && WHEEL=""
if [[ -n "$WHEEL" ]]; then
  SCRATCH="$(mktemp -d)"
  run wheel 60 "$LOGS/wheel.log" "$PYTHON" -m pip install --no-deps --no-index \
    --target "$SCRATCH/site" "$WHEEL"
  cp -r tests bench tools csrc setup.py pyproject.toml "$SCRATCH/"
  cd "$SCRATCH"
  export PYTHONPATH="$SCRATCH/site:$SCRATCH"
  record build skipped 0 "checking the installed wheel $(basename "$WHEEL") instead"
elif ((CUDA_TORCH)) && ((HAVE_GPU)); then
  run build 240 "$LOGS/build.log" env TORCH_CUDA_ARCH_LIST="$ARCH" FUSED_OPT_CUDA=1 \
    MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace
else
  record build skipped 0 "torch is not a CUDA build or no GPU is visible: the installed build is checked"
fi

# 2. The health check: what loads, for which archs, two steps against torch.optim.
run health 60 "$LOGS/health.log" "$PYTHON" -m fused_opt

# 3. The CUDA tests (every test marked cuda: the CUDA suite and the optimizer suite on the cuda
#    backend) and 4. compute-sanitizer, side by side: both only check.
JUNIT="$(mktemp --suffix .xml)"
XDIST=()
"$PYTHON" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
# The bench keeps the last BENCH_SECONDS of the budget: the checks get what is left before it.
BENCH_SECONDS=170
CHECK_SECONDS=$(($(left) - BENCH_SECONDS))
((CHECK_SECONDS > 240)) && CHECK_SECONDS=240
run tests "$CHECK_SECONDS" "$LOGS/tests.log" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
  --continue-on-collection-errors "${XDIST[@]}" --junitxml="$JUNIT" tests &
TESTS_PID=$!
if ((HAVE_GPU)) && command -v compute-sanitizer >/dev/null; then
  pids=()
  for tool in memcheck racecheck synccheck initcheck; do
    run "sanitizer-$tool" "$CHECK_SECONDS" "$LOGS/sanitizer-$tool.log" compute-sanitizer --tool "$tool" \
      --error-exitcode 1 "$PYTHON" tools/gpu_step.py &
    pids+=($!)
  done
  wait "${pids[@]}"
else
  record sanitizer skipped 0 "no GPU or no compute-sanitizer on PATH"
fi
wait "$TESTS_PID"

# 5. The benchmark, alone on the GPU: torch.optim's three modes beside fused_opt, against the
#    device-copy floor.
if ((HAVE_GPU)); then
  run bench "$BENCH_SECONDS" "$LOGS/bench.log" "$PYTHON" -m bench --device cuda \
    --workloads gpt2-small,many-small,tiny --no-e2e --no-peers --out "$RESULTS/bench"
else
  record bench skipped 0 "no GPU"
fi

# The results file: every step, the test counts, each sanitizer's verdict, the bench table.
"$PYTHON" - "$RESULTS" "$STAMP" "$STEPS" "$JUNIT" "$GPU" "$ARCH" "$(($(date +%s) - START))" <<'PY'
import json, platform, re, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

results, stamp, steps_file, junit, gpu, arch, seconds = sys.argv[1:]
results = Path(results)
steps = [dict(zip(("step", "status", "seconds", "note"), line.rstrip("\n").split("\t")))
         for line in Path(steps_file).read_text().splitlines()]
tests = {}
try:
    suite = ET.parse(junit).getroot()
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        tests.setdefault(outcome, []).append(f"{case.get('classname')}::{case.get('name')}")
except (ET.ParseError, FileNotFoundError):
    pass
import torch
env = {
    "date": stamp[:15], "gpu": gpu, "arch": arch, "python": platform.python_version(),
    "torch": torch.__version__, "command": "make gpu-check (tools/gpu_check.sh)",
    "wall_seconds": int(seconds),
}
try:
    env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    env["nvcc"] = "not found"
bench_md = sorted((results / "bench").glob("*.md")) if (results / "bench").is_dir() else []
summary = ""
if bench_md:
    text = bench_md[-1].read_text()
    match = re.search(r"^\| workload \| dtype \| optimizer \| floor.*?(?=\n\n)", text, re.S | re.M)
    summary = match.group(0) if match else ""
data = {"environment": env, "steps": steps,
        "tests": {k: len(v) for k, v in tests.items()},
        "failed_tests": tests.get("failed", []), "bench_file": bench_md[-1].name if bench_md else None}
(results / f"{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
lines = [f"# GPU check, {env['date']} UTC, {gpu} (sm {arch or '-'})", "",
         f"`{env['command']}`; python {env['python']}, torch {env['torch']}, {env['nvcc']}; "
         f"{seconds} s wall.", "", "| step | status | seconds | note |", "|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
lines += ["", "Tests marked cuda: " + (", ".join(f"{len(v)} {k}" for k, v in sorted(tests.items())) or "no report")]
lines += [f"- FAILED {name}" for name in tests.get("failed", [])]
if summary:
    lines += ["", f"Benchmark ({bench_md[-1].name}):", "", summary]
(results / f"{stamp}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"gpu_check: wrote {results / stamp}.md and .json")
PY
tar -czf "$RESULTS/${STAMP}_logs.tar.gz" -C "$LOGS" .
echo "gpu_check: logs in $RESULTS/${STAMP}_logs.tar.gz"
rm -rf "$STEPS" "$JUNIT" "$LOGS"
