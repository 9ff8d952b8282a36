#!/usr/bin/env bash
# Compile check of the CUDA kernels, for machines with or without a GPU.
#
#   1. every csrc/cuda/*.cu with `nvcc -c` for the archs a default build compiles (setup.py's
#      cuda_arch_list: torch's archs that this nvcc builds, PTX for the newest) and with the
#      flags torch's extension builder uses (C++20), warnings and register spills as errors;
#      CUDA_CHECK_ARCHS="8.0 9.0" checks fewer, faster;
#   2. the torch glue (csrc/cuda/ops_cuda.cpp) with `g++ -fsyntax-only` against the installed
#      torch's headers (a CPU build of torch has the stable ABI's headers too), with the build's
#      standard (C++17, setup.py's STABLE_CXX_STD) and macros: the stable ABI of the target torch
#      and CPython's limited API only.
#
# Exits non-zero on any failure. Without nvcc it says so and exits 0 (nothing to check); set
# FUSED_OPT_REQUIRE_NVCC=1 to make that an error. NVCC, CXX and PYTHON override the tools.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/csrc/cuda"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: nvcc not found; CUDA sources not checked" >&2
  [[ "${FUSED_OPT_REQUIRE_NVCC:-0}" == 1 ]] && exit 1
  exit 0
fi
CXX="${CXX:-g++}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The archs of a default build, as setup.py chooses them ("7.5 ... 12.0+PTX").
if [[ -z "${CUDA_CHECK_ARCHS:-}" ]]; then
  CUDA_CHECK_ARCHS="$(cd "$ROOT" && "$PYTHON" -c '
import sys, setup, torch
print(" ".join(setup.cuda_arch_list("", setup.torch_cuda_archs(torch), setup.nvcc_archs(sys.argv[1]))))
' "$NVCC")"
fi
GENCODE=()
for arch in $CUDA_CHECK_ARCHS; do
  code="${arch%+PTX}"; code="${code/./}"
  GENCODE+=("-gencode=arch=compute_$code,code=sm_$code")
  [[ "$arch" == *+PTX ]] && GENCODE+=("-gencode=arch=compute_$code,code=compute_$code")
done

NVCC_FLAGS=(
  -std=c++20 -c
  "${GENCODE[@]}"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  --Werror all-warnings
  -Xcompiler=-Wall,-Wextra,-Werror
  -Xptxas=--warn-on-spills,--warning-as-error
)

echo "check_cuda: $("$NVCC" --version | tail -1)"
status=0
pids=()
names=()
for cu in "$SRC"/*.cu; do
  name="$(basename "$cu" .cu)"
  "$NVCC" "${NVCC_FLAGS[@]}" "$cu" -o "$WORK/$name.o" >"$WORK/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
done
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "check_cuda: ${names[$i]}.cu ok ($CUDA_CHECK_ARCHS)"
  else
    echo "check_cuda: ${names[$i]}.cu FAILED" >&2
    cat "$WORK/${names[$i]}.log" >&2
    status=1
  fi
done

# The glue needs torch's and Python's headers, and CUDA's runtime API header.
if paths="$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))
PY
)"; then
  includes=()
  while IFS= read -r dir; do includes+=(-isystem "$dir"); done <<<"$paths"
  # The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script).
  touch "$WORK/empty.cu"
  cuda_top="$("$NVCC" --dryrun -c "$WORK/empty.cu" -o "$WORK/empty.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  includes+=(-isystem "${CUDA_HOME:-$cuda_top}/include")
  # The macros of the build (setup.py: stable_abi_macros and USE_CUDA): the glue may use only
  # torch's stable ABI of the target version and CPython's limited API.
  macros=($(cd "$ROOT" && "$PYTHON" -c 'import setup; print(" ".join(f"-D{k}={v}" for k, v in setup.stable_abi_macros()))') -DUSE_CUDA=1)
  cxx_std=$(cd "$ROOT" && "$PYTHON" -c 'import setup; print(setup.STABLE_CXX_STD)')  # C++17
  if "$CXX" "$cxx_std" -fsyntax-only -Wall -Wextra -Werror "${macros[@]}" "${includes[@]}" "$SRC/ops_cuda.cpp"; then
    echo "check_cuda: ops_cuda.cpp ok (g++ -fsyntax-only against torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  else
    echo "check_cuda: ops_cuda.cpp FAILED" >&2
    status=1
  fi
else
  echo "check_cuda: torch not importable with $PYTHON; glue not checked" >&2
fi
exit $status
