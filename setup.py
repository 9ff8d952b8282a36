"""Build script: the one owner of every build decision.

Environment variables (the same table is in docs/INSTALL.md; tests/test_wheel.py checks it):

  FUSED_OPT_BUILD_EXT   auto | 1 | 0   compile the kernels. auto (default): when a C++ compiler
                                       is found; 0: pure-Python package (torch backend only).
  FUSED_OPT_CUDA        auto | 1 | 0   compile the CUDA kernels. auto (default): when nvcc and a
                                       CUDA build of torch are present; 1: fail if they are not.
  TORCH_CUDA_ARCH_LIST  e.g. "8.0;9.0"  CUDA archs; unset: every arch the installed torch was
                                       built for (else FALLBACK_CUDA_ARCHS) that nvcc can build.
                                       The newest always gets PTX too, so newer GPUs can JIT it.
  CUDA_HOME             path           the CUDA toolkit; unset: the one `nvcc --dryrun` names.
  FUSED_OPT_CPU_ISAS    e.g. "avx2"    SIMD variants to compile besides the portable baseline
                                       (default: those of avx2, avx512, avx512bf16 on x86-64,
                                       neon, neonbf16, sve128, sve256 on aarch64 Linux, that the
                                       compiler can build). The target is the compiler's.
  MAX_JOBS              N              parallel compile jobs (torch's ninja builder).
  CXX, NVCC             paths          the compilers.

Versions: the compiled kernels use torch's stable ABI (TORCH_TARGET) and CPython's limited API
(PYTHON_TARGET), so a build requires torch>=TORCH_TARGET and its wheel is tagged cp310-abi3. The
accelerator fused_opt._C_direct is the exception: built against this torch and this Python, it is
loaded only where both match. A CUDA build from a checkout carries the local label of its CUDA
major (0.1.0+cu13); a build from the sdist keeps the sdist's plain version (pip refuses a wheel
whose version differs from the sdist it came from). A pure-Python build (FUSED_OPT_BUILD_EXT=0)
requires any torch>=2.4. Every build writes fused_opt/_build_info.json (shown by
`python -m fused_opt`); the sdist ships sources only.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"
# torch's cu130 wheels' archs, T4 to RTX 50xx: the default when torch does not say its own.
FALLBACK_CUDA_ARCHS = ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0")
X86_ISAS = ("avx2", "avx512", "avx512bf16")
# isa.cpp ranks them (the default is the best one the CPU runs).
AARCH64_ISAS = ("neon", "neonbf16", "sve128", "sve256")


def env_choice(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "1", "0"):
        sys.exit(f"setup.py: {name} must be auto, 1 or 0, not {value!r}")
    return value


def have_cxx() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def arch_name(machine: str) -> str:
    """x86_64 or aarch64 under either of their names (AMD64 and arm64 are Windows' and macOS')."""
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


def target_arch() -> str:
    """The CPU the C++ compiler (CXX) builds for ("x86_64", "aarch64", ...): the target of its
    -dumpmachine triple (a cross compiler's, not this machine's), else this machine's."""
    return _target_of(os.environ.get("CXX", "c++"))


@functools.cache
def _target_of(cxx: str) -> str:  # one compiler run per compiler, however often asked
    try:
        out = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, timeout=60)
        arch = out.stdout.strip().split("-")[0] if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        arch = ""
    return arch_name(arch or platform.machine())


def cross_compiling() -> bool:
    return target_arch() != arch_name(platform.machine())


def known_isas() -> tuple[str, ...]:
    """The SIMD variants of the target: x86-64's, or aarch64's on Linux (isa.cpp reads HWCAP)."""
    arch = target_arch()
    if arch == "x86_64" and sys.platform != "win32":
        return X86_ISAS
    if arch == "aarch64" and sys.platform.startswith("linux"):
        return AARCH64_ISAS
    return ()


def cpu_isas() -> list[str]:
    """The SIMD variants to compile: FUSED_OPT_CPU_ISAS, else every one of the target's that the
    compiler can build (GCC < 10 and Clang < 9 lack -mavx512bf16, GCC < 10 and Clang < 11 +bf16:
    such a build leaves those variants out)."""
    known = known_isas()
    requested = os.environ.get("FUSED_OPT_CPU_ISAS")
    if requested is None:
        isas = [isa for isa in known if compiler_builds(isa)]
        if skipped := [isa for isa in known if isa not in isas]:
            print(f"setup.py: the C++ compiler cannot build {skipped}; left out", file=sys.stderr)
        return isas
    isas = [isa.strip() for isa in requested.replace(";", ",").split(",") if isa.strip()]
    unknown = set(isas) - set(known)
    if unknown:
        sys.exit(
            f"setup.py: unknown FUSED_OPT_CPU_ISAS {sorted(unknown)}; known for "
            f"{target_arch()}: {known}"
        )
    if unbuildable := [isa for isa in isas if not compiler_builds(isa)]:
        sys.exit(f"setup.py: the C++ compiler cannot build FUSED_OPT_CPU_ISAS {unbuildable}")
    return isas


# One intrinsic each variant needs that older compilers lack, and its header.
ISA_PROBES = {
    "avx2": "_mm256_fmadd_ps(_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps())",
    "avx512": "_mm512_fpclass_ps_mask(_mm512_setzero_ps(), 0x20)",
    "avx512bf16": "_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_setzero_ps())",
    "neon": "vfmaq_f32(vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0))",
    "neonbf16": "vcvtq_low_bf16_f32(vdupq_n_f32(0))",
    "sve128": "svcvt_bf16_f32_x(svptrue_b32(), svdup_n_f32(0))",
    "sve256": "svcvt_bf16_f32_x(svptrue_b32(), svdup_n_f32(0))",
}
ISA_HEADERS = {"neon": "arm_neon.h", "neonbf16": "arm_neon.h", "sve128": "arm_sve.h",
               "sve256": "arm_sve.h"}  # fmt: skip


def compiler_builds(isa: str) -> bool:
    """Whether the C++ compiler accepts ``isa``'s flags and intrinsics."""
    header = ISA_HEADERS.get(isa, "immintrin.h")
    source = f"#include <{header}>\nvoid probe() {{ (void){ISA_PROBES[isa]}; }}\n"
    cxx = os.environ.get("CXX", "c++")
    command = [cxx, "-x", "c++", "-c", "-", "-o", os.devnull, *CPU_ISA_FLAGS[isa]]
    try:
        return subprocess.run(command, input=source, capture_output=True, text=True).returncode == 0
    except OSError:
        return False


def compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def write_build_info(info: dict) -> None:
    """Record what was built next to the package; package data, so it ships in the wheel."""
    path = ROOT / "fused_opt" / "_build_info.json"
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def cuda_label(cuda_version: str | None) -> str | None:
    """'13.0' -> 'cu13': the local version label of a CUDA build. It names the CUDA major whose
    runtime the binary links (that of the node's torch), not a torch release: any torch from
    TORCH_TARGET on runs it. A CPU build has none."""
    return f"cu{cuda_version.split('.')[0]}" if cuda_version else None


def building_sdist() -> bool:
    """`sdist` (and the `egg_info` pip runs before it) packs sources: no torch, no build info."""
    return any(command in ("sdist", "egg_info") for command in sys.argv[1:])


def from_sdist() -> bool:
    """An unpacked sdist has PKG-INFO at its root; a checkout does not."""
    return (ROOT / "PKG-INFO").is_file()


# ---- CPU kernels (csrc/cpu) -------------------------------------------------------------------
# Each SIMD variant is one translation unit compiled with its own flags (never -march=native).
CPU_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": [
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-Wno-maybe-uninitialized",  # a false positive in GCC 12's own headers
    ],
}
CPU_ISA_FLAGS["avx512bf16"] = CPU_ISA_FLAGS["avx512"] + ["-mavx512bf16"]
# aarch64: NEON (ASIMD) is in every v8-A core; +bf16 adds BFCVTN (Neoverse V1, N2 and later);
# SVE at a fixed vector length, one variant per length (simd_sve.h says why).
CPU_ISA_FLAGS["neon"] = ["-march=armv8-a"]
CPU_ISA_FLAGS["neonbf16"] = ["-march=armv8.2-a+bf16"]
for _bits in (128, 256):
    CPU_ISA_FLAGS[f"sve{_bits}"] = ["-march=armv8.2-a+sve+bf16", f"-msve-vector-bits={_bits}"]
# C++17, not torch's C++20, for the stable-ABI libraries: in C++20 libstdc++'s ostringstream::str()
# (torch's STD_TORCH_CHECK uses it) is a GLIBCXX_3.4.29 symbol, which manylinux_2_28 nodes lack.
STABLE_CXX_STD = "-std=c++17"
# FMA only where the kernels ask for it (fmadd), so every variant does documented arithmetic.
CPU_KERNEL_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", STABLE_CXX_STD]


# The stable ABI version the compiled ops target: the lowest torch whose stable ABI has what they
# use (tensor lists, parallel_for and get_num_threads: 2.10). docs/INSTALL.md says why.
TORCH_TARGET = "2.10"
# CPython's limited API: one binary for every Python from this version on (abi3).
PYTHON_TARGET = "3.10"


def stable_abi_macros() -> list[tuple[str, str]]:
    """Macros that hold a binary to torch's stable ABI of TORCH_TARGET and CPython's limited API
    of PYTHON_TARGET (with TORCH_TARGET_VERSION, torch's unstable headers refuse to compile)."""
    torch_major, torch_minor = (int(x) for x in TORCH_TARGET.split("."))
    py_major, py_minor = (int(x) for x in PYTHON_TARGET.split("."))
    return [
        ("TORCH_TARGET_VERSION", f"0x{torch_major:02x}{torch_minor:02x}000000000000"),
        ("Py_LIMITED_API", f"0x{py_major:02X}{py_minor:02X}0000"),  # as setuptools spells it
    ]


def glibc_floor() -> tuple[list[str], list[str]]:
    """(sources, link flags) that hold a library to glibc 2.28 symbols (csrc/common/glibc_floor.cpp)
    on Linux with glibc; nothing elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return [], []
    # libdl.so.2: where dlsym@GLIBC_2.2.5 lives before glibc 2.34, so that it is loaded there
    # (named by its soname: newer glibc ships only that stub and an empty libdl.a).
    return ["csrc/common/glibc_floor.cpp"], [
        "-Wl,--wrap=pow",
        "-Wl,--wrap=dlsym",
        "-Wl,--no-as-needed,-l:libdl.so.2",
    ]


def cpu_extension(root: Path, isas: list[str]):
    """The fused_opt._C extension: CPU kernels, one object per SIMD variant, and the glue, on the
    stable ABI and the limited API.

    The glue and the portable baseline are the extension's own sources; each ISA variant's
    kernels_<isa>.cpp is listed in ``ext.isa_sources`` with its flags and compiled by the
    build_ext of with_isa_objects() (torch's BuildExtension has one set of flags per extension).
    """
    from torch.utils.cpp_extension import CppExtension

    if sys.platform == "win32":  # the ISA flags and cpu detection below are GCC/Clang's
        isas = []
    cpu = "csrc/cpu"
    floor_sources, floor_flags = glibc_floor()
    sources = [f"{cpu}/{name}.cpp" for name in ("ops", "isa", "module", "kernels_baseline")]
    ext = CppExtension(
        "fused_opt._C",
        sources + floor_sources,
        extra_compile_args=[] if sys.platform == "win32" else CPU_KERNEL_FLAGS,
        extra_link_args=floor_flags,
        define_macros=[(f"FUSED_OPT_HAVE_{isa.upper()}", "1") for isa in isas]
        + stable_abi_macros(),
        depends=[str(path.relative_to(root)) for path in sorted((root / cpu).glob("*.h"))],
        py_limited_api=True,
    )
    ext.isa_sources = [
        (f"{cpu}/kernels_{isa}.cpp", CPU_KERNEL_FLAGS + CPU_ISA_FLAGS[isa]) for isa in isas
    ]
    return ext


def direct_extension(root: Path):
    """The optional accelerator fused_opt._C_direct: the direct entry points, on torch's C++ API
    and the full CPython API, so tied to the torch and the Python it is built with (fused_opt
    loads it only there)."""
    from torch.utils.cpp_extension import CppExtension

    headers = sorted((root / "csrc" / "direct").glob("*.h")) + sorted(
        (root / "csrc/cpu").glob("*.h")
    )
    floor_sources, floor_flags = glibc_floor()
    # at::parallel_for is inline OpenMP in torch's headers: the accelerator compiles it.
    openmp = {"linux": ["-fopenmp"], "win32": ["/openmp"]}.get(sys.platform, [])
    return CppExtension(
        "fused_opt._C_direct",
        ["csrc/direct/module.cpp", *floor_sources],
        extra_compile_args=openmp + ([] if sys.platform == "win32" else ["-O3"]),
        extra_link_args=floor_flags + (openmp if sys.platform == "linux" else []),
        depends=[str(path.relative_to(root)) for path in headers],
    )


def with_isa_objects(build_ext_class):
    """A build_ext that first compiles an extension's ``isa_sources``, each with its own flags,
    and links the objects in."""

    class BuildExtWithIsaObjects(build_ext_class):
        def build_extension(self, ext):
            isa_objects = []
            for source, flags in getattr(ext, "isa_sources", ()):
                isa_objects += self.compiler.compile(
                    [source],
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    extra_postargs=flags,
                    depends=ext.depends,
                )
            ext.extra_objects = [o for o in ext.extra_objects if o not in isa_objects]
            ext.extra_objects += isa_objects
            super().build_extension(ext)

    return BuildExtWithIsaObjects


# ---- CUDA kernels (csrc/cuda) ------------------------------------------------------------------
def find_cuda_home() -> Path | None:
    """The CUDA toolkit: CUDA_HOME (or CUDA_PATH) if set, else the one the `nvcc` on PATH runs
    (else /usr/local/cuda's).

    torch guesses the toolkit as the folder above `nvcc`, which is wrong when `nvcc` is a
    wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc): the build would
    then fail late, with `cuda_runtime.h: No such file`. `nvcc --dryrun` names the real one.
    Exits with a message when the toolkit named or found lacks its headers.
    """
    named = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if named:
        home = Path(named)
        source = "CUDA_HOME"
    else:
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
        if nvcc is None and Path("/usr/local/cuda/bin/nvcc").is_file():
            nvcc = "/usr/local/cuda/bin/nvcc"  # torch's own last guess
        if nvcc is None:
            return None
        home = nvcc_toolkit(nvcc) or Path(nvcc).resolve().parent.parent
        source = f"the toolkit of {nvcc}"
    if not (home / "include" / "cuda_runtime.h").is_file() or not (home / "bin" / "nvcc").is_file():
        sys.exit(
            f"setup.py: {source} ({home}) has no include/cuda_runtime.h or bin/nvcc; set "
            "CUDA_HOME to the CUDA toolkit (the folder with bin/nvcc and include/), or "
            "FUSED_OPT_CUDA=0 to build without the CUDA kernels"
        )
    return home.resolve()


def nvcc_toolkit(nvcc: str) -> Path | None:
    """The toolkit folder `nvcc --dryrun` reports (its TOP), or None."""
    with tempfile.TemporaryDirectory() as work:
        source = Path(work, "empty.cu")
        source.write_text("")
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(source), "-o", str(Path(work, "empty.o"))],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def nvcc_archs(nvcc: str) -> set[str] | None:
    """The archs ("9.0", ...) this nvcc builds SASS for, or None if it does not say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    except OSError:
        return None
    codes = re.findall(r"sm_(\d+)(?![a-z\d])", out.stdout)
    return {f"{int(c) // 10}.{int(c) % 10}" for c in codes} or None


def torch_cuda_archs(torch) -> list[str]:  # noqa: ANN001
    """The archs the installed CUDA torch was built for (asking needs no GPU), oldest first."""
    get_flags = getattr(torch._C, "_cuda_getArchFlags", None)
    flags = (get_flags() if get_flags else None) or ""
    codes = {int(c) for c in re.findall(r"(?:sm|compute)_(\d+)(?![a-z\d])", flags)}
    archs = [f"{c // 10}.{c % 10}" for c in sorted(codes)]
    return archs or list(FALLBACK_CUDA_ARCHS)


def cuda_arch_list(requested: str, torch_archs: list[str], buildable: set[str] | None) -> list[str]:
    """TORCH_CUDA_ARCH_LIST's entries: ``requested`` (else torch's archs that nvcc builds), the
    newest with +PTX. Exits naming any arch nvcc cannot build or that predates Volta (7.0),
    whose large kernel-parameter space the launches rely on."""
    names = [a for a in requested.replace(" ", ";").split(";") if a]
    archs = [a.removesuffix("+PTX") for a in names]
    if not archs:
        archs = [a for a in torch_archs if buildable is None or a in buildable]
    too_old = [a for a in archs if re.match(r"[0-6]\.", a)]
    if too_old:
        sys.exit(f"setup.py: CUDA archs {too_old} predate Volta (7.0), which the kernels need")

    def base(arch: str) -> str:  # "9.0a" -> "9.0"
        match = re.match(r"\d+\.\d", arch)
        return match.group(0) if match else arch

    if buildable is not None and (unknown := [a for a in archs if base(a) not in buildable]):
        sys.exit(
            f"setup.py: this nvcc cannot build CUDA archs {unknown} (it builds "
            f"{', '.join(sorted(buildable, key=float))}); drop them from TORCH_CUDA_ARCH_LIST"
        )
    archs = sorted(set(archs), key=lambda a: [int(x) for x in re.findall(r"\d+", a)])
    return archs[:-1] + [archs[-1] + "+PTX"]


def cuda_extension(root: Path, choice: str):
    """The fused_opt._C_cuda extension, or None when CUDA is not built.

    Returns (extension, cuda_version, archs). Needs a CUDA build of torch and a CUDA toolkit
    (find_cuda_home); FUSED_OPT_CUDA=1 makes their absence an error, 0 skips CUDA. The archs:
    see cuda_arch_list.
    """
    if choice == "0":
        return None
    import torch
    from torch.utils import cpp_extension

    problems = []
    home = find_cuda_home() if torch.version.cuda else None
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif home is None:
        problems.append("no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if choice == "1":
            sys.exit("setup.py: FUSED_OPT_CUDA=1 but " + " and ".join(problems))
        print(f"setup.py: CUDA kernels not built: {' and '.join(problems)}", file=sys.stderr)
        return None
    # torch's builder reads the toolkit from its module (guessed when imported) and the env.
    os.environ["CUDA_HOME"] = str(home)
    cpp_extension.CUDA_HOME = str(home)

    nvcc = str(home / "bin" / "nvcc")
    version_text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", version_text)
    cuda_version = match.group(1) if match else torch.version.cuda

    arch_list = cuda_arch_list(
        os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip(), torch_cuda_archs(torch),
        nvcc_archs(nvcc),
    )  # fmt: skip
    # torch's builder reads the list from the environment (and fails without a GPU if unset).
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list)

    cuda = root / "csrc" / "cuda"
    kernels = [f"csrc/cuda/{path.name}" for path in sorted(cuda.glob("*.cu"))]
    headers = sorted(cuda.glob("*.cuh")) + sorted(cuda.glob("*.h"))
    floor_sources, floor_flags = glibc_floor()
    extension = cpp_extension.CUDAExtension(
        "fused_opt._C_cuda",
        ["csrc/cuda/ops_cuda.cpp", *kernels, *floor_sources],
        extra_link_args=floor_flags,
        # No fast math: the kernels must round like torch.optim (IEEE division and sqrt).
        extra_compile_args={"cxx": ["-O3", STABLE_CXX_STD], "nvcc": ["-O3", "-lineinfo"]},
        # USE_CUDA: the CUDA part of AOTInductor's C shim (the current stream).
        define_macros=[*stable_abi_macros(), ("USE_CUDA", "1")],
        depends=[str(path.relative_to(root)) for path in headers],
        py_limited_api=True,
    )
    return extension, cuda_version, arch_list


def main() -> None:
    if building_sdist():
        setup(version=VERSION, install_requires=["torch>=2.4"])
        return
    build_ext = env_choice("FUSED_OPT_BUILD_EXT")
    if build_ext == "auto":
        build_ext = "1" if have_cxx() else "0"
    version = VERSION
    info: dict = {"version": version, "extensions": build_ext == "1"}
    ext_modules: list = []
    cmdclass: dict = {}
    options: dict = {}
    install_requires = ["torch>=2.4"]

    if build_ext == "1":
        import torch
        from torch.utils.cpp_extension import BuildExtension

        info.update(
            torch_version=torch.__version__,
            cxx11_abi=bool(torch.compiled_with_cxx11_abi()),
            compiler=compiler_version(),
            cpu_isas=["baseline"] + (isas := cpu_isas()),
            cuda_version=None,
            cuda_archs=[],
            torch_target=TORCH_TARGET,
            torch_git_version=getattr(torch.version, "git_version", None),
            python_target=PYTHON_TARGET,
            # The accelerator (_C_direct) serves this torch release and this Python only.
            direct_python=None if (cross := cross_compiling()) else platform.python_version(),
            target_arch=(arch := target_arch()),
        )
        ext_modules.append(cpu_extension(ROOT, isas))
        # A cross build (tools/aarch64.sh) has the stable-ABI libraries only: the accelerator
        # and the CUDA glue are built against this machine's torch, of this machine's arch.
        if cross and env_choice("FUSED_OPT_CUDA") == "1":
            sys.exit(f"setup.py: FUSED_OPT_CUDA=1 but this is a cross build for {arch}")
        if cross:
            print(f"setup.py: cross build for {arch}: no _C_direct, no CUDA", file=sys.stderr)
        else:
            ext_modules.append(direct_extension(ROOT))
        # An earlier in-place build's per-Python libraries would shadow the abi3 ones (Python
        # tries the .cpython-3XY suffix first) and load a torch-specific binary under any torch.
        for pattern in ("_C.cpython-*", "_C_cuda.cpython-*"):
            for stale in (ROOT / "fused_opt").glob(pattern):
                stale.unlink()
        cuda = None if cross else cuda_extension(ROOT, env_choice("FUSED_OPT_CUDA"))
        if cuda is not None:
            extension, cuda_version, archs = cuda
            ext_modules.append(extension)
            info.update(cuda_version=cuda_version, cuda_archs=archs)
        cmdclass["build_ext"] = with_isa_objects(BuildExtension).with_options(
            no_python_abi_suffix=False
        )
        # The stable ABI and abi3: any torch from the target on, any Python from 3.10 (the
        # accelerator _C_direct is optional: loaded only where it matches).
        install_requires = [f"torch>={TORCH_TARGET}"]
        options["bdist_wheel"] = {"py_limited_api": "cp" + PYTHON_TARGET.replace(".", "")}
        if from_sdist():
            info["from_sdist"] = True  # the sdist's version: no label
        elif label := cuda_label(info["cuda_version"]):
            version = f"{VERSION}+{label}"
            info["version"] = version

    write_build_info(info)
    setup(
        version=version,
        install_requires=install_requires,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options=options,
    )


if __name__ == "__main__":
    main()
