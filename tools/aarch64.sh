#!/usr/bin/env bash
# `make test-aarch64`: build fused_opt for aarch64 on an x86-64 Debian machine and test it under
# qemu user-mode emulation, with no Arm machine (docs/CPU_KERNELS.md, "aarch64").
#
#   tools/aarch64.sh [env|wheel|test]...   (default: env wheel test)
#
#   env    Debian's aarch64 cross compiler and qemu-user (apt, as root), and under
#          build/aarch64/: an aarch64 CPython 3.11 from Debian's arm64 packages (unpacked, not
#          installed: the host's own python3.11 stays) and a site folder with PyPI's aarch64
#          CPU torch (TORCH_AARCH64, default the stable ABI target, 2.10), numpy and pytest.
#   wheel  cross-builds the manylinux_2_28_aarch64 wheel (every aarch64 SIMD variant) against
#          the host venv's torch headers and the aarch64 torch's libraries, checks it with
#          tools/check_wheel.py, and unpacks it into build/aarch64/fused_opt for the tests.
#   test   runs the kernel tests and the optimizer tests under qemu, once per emulated CPU:
#          each run holds the variants that CPU can run (tests compare every one with the
#          portable one and with torch.optim) and checks the one run time detection picks.
#
#   PYTHON  the host interpreter with torch (default: .venv's); WHEEL_DIR (default wheelhouse/)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/build/aarch64
root=$work/root          # the aarch64 CPython (usr/bin/python3.11) and its libraries
site=$work/site          # aarch64 torch, numpy, pytest, hypothesis
pkg=$work/pkg            # the unpacked fused_opt wheel
TORCH_AARCH64=${TORCH_AARCH64:-2.10.0}  # a CPU build; PyPI's aarch64 torch 2.13 is a CUDA one (GBs)
PYTHON=${PYTHON:-$repo/.venv/bin/python}
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')  # absolute: the steps change dirs
WHEEL_DIR=${WHEEL_DIR:-$repo/wheelhouse}
CXX_AARCH64=aarch64-linux-gnu-g++
# Debian bookworm's arm64 CPython 3.11 and what it and torch load.
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev
      libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libuuid1 libcrypt1 libncursesw6
      libtinfo6 libreadline8 libsqlite3-0 libdb5.3 libnsl2 libtirpc3 libc6 libgcc-s1
      libstdc++6 libgomp1)
PLATFORM=manylinux_2_28_aarch64
# torch's dependencies, the tests' and theirs (no dependency resolution: each one named).
SITE_PACKAGES=("numpy<2.5" filelock typing-extensions sympy mpmath networkx jinja2 MarkupSafe
               fsspec pytest iniconfig packaging pluggy pygments hypothesis attrs
               sortedcontainers)

log() { echo "aarch64: $*" >&2; }
# What this machine cannot provide (root, apt, the registries): exit 3, which .ci/run reports as
# a skip; any other failure is a failure.
cannot() { log "SKIPPED: cannot set up the aarch64 environment: $*"; exit 3; }

step_env() {
    local start=$SECONDS
    mkdir -p "$work"
    if ! command -v "$CXX_AARCH64" >/dev/null || ! command -v qemu-aarch64 >/dev/null \
        || ! dpkg --print-foreign-architectures | grep -qx arm64; then
        [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
            || cannot "apt as root is needed for g++-aarch64-linux-gnu and qemu-user"
        { dpkg --add-architecture arm64 && apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu \
            qemu-user; } >"$work/apt.log" 2>&1 || cannot "apt-get failed ($work/apt.log)"
    fi
    if [ ! -x "$root/usr/bin/python3.11" ]; then
        rm -rf "$root" "$work/debs" && mkdir -p "$root" "$work/debs"
        (cd "$work/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}") >"$work/apt.log" 2>&1 \
            || cannot "apt-get download of the arm64 CPython failed ($work/apt.log)"
        for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$root"; done
    fi
    local want="torch==$TORCH_AARCH64 ${SITE_PACKAGES[*]}"
    if [ "$(cat "$site/.packages" 2>/dev/null)" != "$want" ]; then
        rm -rf "$site" "$work/wheels" && mkdir -p "$site" "$work/wheels"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --platform "$PLATFORM" --python-version 3.11 --implementation cp \
            --dest "$work/wheels" "torch==$TORCH_AARCH64" "${SITE_PACKAGES[@]}" \
            >"$work/pip.log" 2>&1 || {
            # A pin with no wheel is a failure; an unreachable registry is a skip.
            grep -q "No matching distribution" "$work/pip.log" && { cat "$work/pip.log"; exit 1; }
            cannot "pip download of the aarch64 wheels failed ($work/pip.log)"
        }
        # Unpacked, not installed: pip would resolve the dependencies with the host's markers.
        for wheel in "$work"/wheels/*.whl; do (cd "$site" && unzip -qo "$wheel"); done
        echo "$want" >"$site/.packages"
    fi
    log "env ready in $((SECONDS - start)) s: $(run_py -c 'import sys, platform, torch;
print(platform.machine(), sys.version.split()[0], "torch", torch.__version__)')"
}

# The aarch64 Python under qemu (QEMU_CPU picks the emulated CPU), with the site folder and the
# unpacked wheel on its path. The guest's argv[0] (so sys.executable) is a host script that does
# the same, so that the tests' subprocesses run under qemu too.
run_py() {
    cat >"$work/python3" <<EOF_WRAPPER
#!/bin/sh
exec env QEMU_LD_PREFIX="$root" PYTHONPATH="$pkg:$site" PYTHONDONTWRITEBYTECODE=1 \\
    qemu-aarch64 -0 "\$0" "$root/usr/bin/python3.11" "\$@"
EOF_WRAPPER
    chmod +x "$work/python3"
    QEMU_CPU=${QEMU_CPU:-max} "$work/python3" "$@"
}

step_wheel() {
    local start=$SECONDS src=$work/src
    # A cross build, from a copy of the sources (the checkout's build info and libraries stay
    # the host's): the host's setuptools and torch headers, the aarch64 compiler, pyconfig.h and
    # libraries (ld skips the host's x86-64 libtorch on its path and takes these).
    rm -rf "$src" "$work/dist" && mkdir -p "$src" "$work/dist"
    (cd "$repo" && git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$src")
    (cd "$src" && CC=aarch64-linux-gnu-gcc CXX=$CXX_AARCH64 LDSHARED="$CXX_AARCH64 -shared" \
        CFLAGS="-I$root/usr/include" CXXFLAGS="-I$root/usr/include" LDFLAGS="-L$site/torch/lib" \
        FUSED_OPT_BUILD_EXT=1 FUSED_OPT_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
        "$PYTHON" setup.py bdist_wheel --plat-name "$PLATFORM" --dist-dir "$work/dist" \
        >"$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
    local wheel
    wheel=$(ls "$work"/dist/fused_opt-*.whl)
    "$PYTHON" "$repo/tools/check_wheel.py" "$wheel"
    mkdir -p "$WHEEL_DIR" && cp "$wheel" "$WHEEL_DIR/"
    rm -rf "$pkg" && mkdir -p "$pkg" && (cd "$pkg" && unzip -qo "$wheel")
    log "wheel $WHEEL_DIR/$(basename "$wheel") in $((SECONDS - start)) s"
}

# Emulated CPUs: "qemu -cpu" value = the variants its run must detect, lowest first. qemu's
# neoverse-n1 (Graviton 2) has NEON only; "max" has SVE, FEAT_BF16 and SVE-BF16, at the vector
# length set in bytes (torch needs v8.2-a: a Cortex-A72 gets SIGILL).
CPUS=("neoverse-n1=baseline,neon"
      "max,sve-default-vector-length=16=baseline,neon,sve128,neonbf16"
      "max,sve-default-vector-length=32=baseline,neon,neonbf16,sve256")
# Run on the first CPU: the op-level tests (every variant against the portable kernels and
# torch.optim) and the optimizer-level ones (the default variant against torch.optim). On the
# others, the op-level tests of the variants the first cannot run and the optimizer-level tests
# of the cpp backend, on the variant each picks.
TESTS=(test_cpu_kernels.py test_parity.py)
SELECT=(""
        "neonbf16 or sve128 or detection or (test_parity and cpp-cpu)"
        "sve256 or detection or (test_parity and cpp-cpu)")
# torch 2.10's own fused CPU Adam (the reference of one test; the torch backend calls it) leaves
# the fp32 math by more than one rounding on an element of 16-bit params; the cpp kernels match
# the rounded fp32 math (test_low_precision_is_fp32_math_rounded_once[cpp-...]).
SKIP_TORCH_210="not test_low_precision_adam_matches_torch_fused and not (test_low_precision_is_fp32_math_rounded_once and torch-cpu)"

step_test() {
    local start=$SECONDS tests=$work/tests entry cpu expected
    # The tests, outside the checkout: its pytest config puts the checkout (and its x86-64
    # fused_opt) on sys.path; here fused_opt is the unpacked aarch64 wheel.
    rm -rf "$tests" && mkdir -p "$tests"
    cp "$repo"/tests/*.py "$tests/"
    printf '[pytest]\naddopts = -ra -p no:cacheprovider\nmarkers =\n    cuda: needs CUDA\n    slow: long\n    wheel: wheels\n' >"$work/pytest.ini"
    local i select
    for i in "${!CPUS[@]}"; do
        entry=${CPUS[$i]}
        cpu=${entry%=*}
        expected=${entry##*=}
        select="${SELECT[$i]:+(${SELECT[$i]}) and }$SKIP_TORCH_210"
        log "qemu -cpu $cpu: expecting variants $expected; -k '$select'"
        (cd "$work" && QEMU_CPU=$cpu FUSED_OPT_TEST_EXPECT_ISAS=$expected \
            run_py -m pytest -q -c "$work/pytest.ini" --rootdir "$work" -k "$select" \
            "${TESTS[@]/#/$tests/}" ${PYTEST_ARGS:-}) || exit 1  # not 3: that is a skip
    done
    log "tests passed on ${#CPUS[@]} emulated CPUs in $((SECONDS - start)) s"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(env wheel test)
for step in "${steps[@]}"; do
    case $step in
    env | wheel | test) "step_$step" ;;
    *) log "unknown step $step (env, wheel, test)"; exit 2 ;;
    esac
done
