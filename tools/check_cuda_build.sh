#!/usr/bin/env bash
# CI: the CUDA extension built as a user's build makes it, and loaded, on a machine without a GPU.
#
# Into its own venv (.venv-cuda, kept between runs) with torch $CUDA_TORCH_VERSION (default
# 2.14.1, a CUDA 13.0 build: about 90 s from the local mirror, 5.5 GB), a copy of the tracked
# sources is built with FUSED_OPT_CUDA=1 and the default archs (about 8 minutes on 2 cores; the
# objects are kept, so a rerun compiles what changed). Then, with no GPU:
#   1. fused_opt._C_cuda imports (so the C++ kernels' signatures matched the Python schemas:
#      registration checks them) and `import fused_opt` records no load error for it;
#   2. every overload of every op has a kernel for the CUDA key;
#   3. the binary holds SASS for every default arch and PTX for the newest (read from its
#      .nv_fatbin section by tools/check_wheel.py: this toolkit has no cuobjdump);
#   4. tests/test_cuda.py passes against that build (host emulation; the GPU tests skip).
# Skipped, with exit 0, where nvcc is missing (FUSED_OPT_REQUIRE_NVCC=1 makes that an error).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_VERSION="${CUDA_TORCH_VERSION:-2.14.1}"
WORK="$ROOT/build/cuda-check"  # the copy of the sources and its objects
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: nvcc not found; the CUDA build is not checked" >&2
  [[ "${FUSED_OPT_REQUIRE_NVCC:-0}" == 1 ]] && exit 1
  exit 0
fi
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" setuptools \
  wheel ninja pytest hypothesis numpy
echo "check_cuda_build: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') ($(($(date +%s) - t0)) s)"

mkdir -p "$WORK"
# The tracked sources, as a user's checkout has them; the objects in $WORK/build stay.
rm -rf "$WORK/src"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$WORK/src")
cd "$WORK/src"
t1=$(date +%s)
FUSED_OPT_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace \
  --build-temp "$WORK/build" >"$WORK/build.log" 2>&1 || {
  tail -40 "$WORK/build.log" >&2
  echo "check_cuda_build: the build FAILED (log: $WORK/build.log)" >&2
  exit 1
}
echo "check_cuda_build: built in $(($(date +%s) - t1)) s"

PYTHONPATH="$WORK/src:$WORK/src/tools" "$PY" - <<'PY'
from pathlib import Path
import torch
import fused_opt
from fused_opt import _ops
from check_wheel import cuda_archs_in, cuda_arch_problems, elf_problems

info = _ops.BUILD_INFO
assert _ops._cuda_module is not None, f"fused_opt._C_cuda did not load: {_ops.LOAD_ERRORS}"
assert "cpp" in _ops.COMPILED, _ops.LOAD_ERRORS
missing = [f"{op}{overload}" for op in ("sgd_", "adam_") for overload in ("", ".tensor_lr")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(
               f"fused_opt::{op}{overload}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
so = Path(_ops._cuda_module.__file__)
binary = so.read_bytes()
sass, ptx_archs = (sorted(archs) for archs in cuda_archs_in(binary))
print(f"check_cuda_build: {so.name}: SASS for sm {sass}, PTX for sm {ptx_archs}; "
      f"build info: {info['cuda_archs']}, CUDA {info['cuda_version']}")
problems = cuda_arch_problems(so.name, binary, info["cuda_archs"])
# What a wheel of this build promises: the stable ABI only, and glibc 2.28 (manylinux_2_28).
for library in (so, Path(_ops.COMPILED["cpp"].__file__)):
    problems += elf_problems(library.name, library.read_bytes(), 28, stable=True)
assert not problems, problems
archs = info["cuda_archs"]
assert archs[0] == "7.5" and archs[-1].endswith("+PTX") and float(archs[-1][:-4]) >= 12, (
    f"the default archs are not torch cu130's with PTX on the newest: {archs}")
print("check_cuda_build: the CUDA kernels load without a GPU and are registered for every op")
PY
PYTHONPATH="$WORK/src" "$PY" -m pytest -q -p no:cacheprovider "$WORK/src/tests/test_cuda.py"
echo "check_cuda_build: ok ($(($(date +%s) - t0)) s in all)"
