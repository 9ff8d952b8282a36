"""Build script: the one owner of every build decision.

Environment variables (the same table is in docs/INSTALL.md; tests/test_wheel.py checks it):

  FUSED_OPT_BUILD_EXT   auto | 1 | 0   compile the kernels. auto (default): when a C++ compiler
                                       is found; 0: pure-Python package (torch backend only).
  FUSED_OPT_CUDA        auto | 1 | 0   compile the CUDA kernels. auto (default): when nvcc and a
                                       CUDA build of torch are present; 1: fail if they are not.
  TORCH_CUDA_ARCH_LIST  e.g. "8.0;9.0+PTX"  CUDA archs; unset: the visible GPUs', or without one
                                       DEFAULT_CUDA_ARCHS below.
  FUSED_OPT_CPU_ISAS    e.g. "avx2"    SIMD variants to compile besides the portable baseline
                                       (default: those of avx2, avx512, avx512bf16 on x86-64
                                       that the compiler can build).
  MAX_JOBS              N              parallel compile jobs (torch's ninja builder).
  CXX, NVCC             paths          the compilers.

Versions: a compiled build works only with the torch minor it was compiled against, so it
requires torch==X.Y.* and, built from a checkout, carries a local version label naming that torch
and its CUDA: 0.1.0+torch2.13cpu, 0.1.0+torch2.11cu130. A build from the sdist keeps the sdist's
plain version (pip refuses a wheel whose version differs from the sdist it came from), and a
pure-Python build (FUSED_OPT_BUILD_EXT=0) is plain and requires any torch>=2.4. Every build writes
fused_opt/_build_info.json (shown by `python -m fused_opt`); the sdist ships sources only.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0+PTX"  # A100, H100/H200, B200 (+PTX for newer GPUs)
X86_ISAS = ("avx2", "avx512", "avx512bf16")


def env_choice(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "1", "0"):
        sys.exit(f"setup.py: {name} must be auto, 1 or 0, not {value!r}")
    return value


def have_cxx() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


def cpu_isas() -> list[str]:
    """The SIMD variants to compile: FUSED_OPT_CPU_ISAS, else every one the compiler can build
    (GCC < 10 and Clang < 9 lack -mavx512bf16: such a build leaves that variant out)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    requested = os.environ.get("FUSED_OPT_CPU_ISAS")
    if requested is None:
        isas = [isa for isa in X86_ISAS if compiler_builds(isa)]
        if skipped := [isa for isa in X86_ISAS if isa not in isas]:
            print(f"setup.py: the C++ compiler cannot build {skipped}; left out", file=sys.stderr)
        return isas
    isas = [isa.strip() for isa in requested.replace(";", ",").split(",") if isa.strip()]
    unknown = set(isas) - set(X86_ISAS)
    if unknown:
        sys.exit(f"setup.py: unknown FUSED_OPT_CPU_ISAS {sorted(unknown)}; known: {X86_ISAS}")
    if unbuildable := [isa for isa in isas if not compiler_builds(isa)]:
        sys.exit(f"setup.py: the C++ compiler cannot build FUSED_OPT_CPU_ISAS {unbuildable}")
    return isas


# One intrinsic each variant needs that older compilers lack.
ISA_PROBES = {
    "avx2": "_mm256_fmadd_ps(_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps())",
    "avx512": "_mm512_fpclass_ps_mask(_mm512_setzero_ps(), 0x20)",
    "avx512bf16": "_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_setzero_ps())",
}


def compiler_builds(isa: str) -> bool:
    """Whether the C++ compiler accepts ``isa``'s flags and intrinsics."""
    if sys.platform == "win32":
        return True  # cpu_extension() builds no ISA variant there
    source = f"#include <immintrin.h>\nvoid probe() {{ (void){ISA_PROBES[isa]}; }}\n"
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


def torch_minor(torch_version: str) -> str:
    """'2.13.0+cpu' -> '2.13'."""
    return ".".join(torch_version.split("+")[0].split(".")[:2])


def local_version_label(torch_version: str, cuda_version: str | None) -> str:
    """'torch2.13cpu', 'torch2.11cu130': the torch minor and CUDA a binary build needs."""
    accelerator = "cu" + "".join(cuda_version.split(".")[:2]) if cuda_version else "cpu"
    return f"torch{torch_minor(torch_version)}{accelerator}"


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
# FMA only where the kernels ask for it (fmadd), so every variant does documented arithmetic.
CPU_KERNEL_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]


def cpu_extension(root: Path, isas: list[str]):
    """The fused_opt._C extension: CPU kernels, one object per SIMD variant, and the glue.

    The glue and the portable baseline are the extension's own sources; each ISA variant's
    kernels_<isa>.cpp is listed in ``ext.isa_sources`` with its flags and compiled by the
    build_ext of with_isa_objects() (torch's BuildExtension has one set of flags per extension).
    """
    from torch.utils.cpp_extension import CppExtension

    if sys.platform == "win32":  # the ISA flags and cpu detection below are GCC/Clang's
        isas = []
    cpu = "csrc/cpu"
    sources = [f"{cpu}/{name}.cpp" for name in ("ops", "step", "isa", "module", "kernels_baseline")]
    # at::parallel_for is a header template: without OpenMP in *our* objects it runs serially.
    openmp = {"linux": ["-fopenmp"], "win32": ["/openmp"]}.get(sys.platform, [])
    ext = CppExtension(
        "fused_opt._C",
        sources,
        extra_compile_args=openmp + ([] if sys.platform == "win32" else CPU_KERNEL_FLAGS),
        extra_link_args=openmp if sys.platform == "linux" else [],
        define_macros=[(f"FUSED_OPT_HAVE_{isa.upper()}", "1") for isa in isas],
        depends=[str(path.relative_to(root)) for path in sorted((root / cpu).glob("*.h"))],
    )
    ext.isa_sources = [
        (f"{cpu}/kernels_{isa}.cpp", CPU_KERNEL_FLAGS + CPU_ISA_FLAGS[isa]) for isa in isas
    ]
    return ext


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
def cuda_extension(root: Path, choice: str, default_archs: str):
    """The fused_opt._C_cuda extension, or None when CUDA is not built.

    Returns (extension, cuda_version, archs). Needs a CUDA build of torch and a CUDA toolkit
    (CUDA_HOME or nvcc on PATH); FUSED_OPT_CUDA=1 makes their absence an error, 0 skips CUDA.
    The archs are TORCH_CUDA_ARCH_LIST, else the visible GPUs', else ``default_archs``; all must
    be Volta (7.0) or newer, whose large kernel-parameter space the launches rely on.
    """
    if choice == "0":
        return None
    import torch
    from torch.utils import cpp_extension

    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    elif cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if choice == "1":
            sys.exit("setup.py: FUSED_OPT_CUDA=1 but " + " and ".join(problems))
        print(f"setup.py: CUDA kernels not built: {' and '.join(problems)}", file=sys.stderr)
        return None

    nvcc = str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    version_text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", version_text)
    cuda_version = match.group(1) if match else torch.version.cuda

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        visible = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{major}.{minor}" for major, minor in sorted(visible)) + "+PTX"
    archs = archs or default_archs
    arch_list = [a for a in archs.replace(" ", ";").split(";") if a]
    too_old = [a for a in arch_list if re.match(r"[0-6]\.", a)]  # named archs are Volta+
    if too_old:
        sys.exit(f"setup.py: CUDA archs {too_old} predate Volta (7.0), which the kernels need")
    # torch's builder reads the list from the environment (and fails without a GPU if unset).
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list)

    cuda = root / "csrc" / "cuda"
    kernels = [f"csrc/cuda/{path.name}" for path in sorted(cuda.glob("*.cu"))]
    headers = sorted(cuda.glob("*.cuh")) + sorted(cuda.glob("*.h"))
    extension = cpp_extension.CUDAExtension(
        "fused_opt._C_cuda",
        ["csrc/cuda/ops_cuda.cpp", *kernels],
        # No fast math: the kernels must round like torch.optim (IEEE division and sqrt).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        depends=[str(path.relative_to(root)) for path in headers],
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
        )
        ext_modules.append(cpu_extension(ROOT, isas))
        cuda = cuda_extension(ROOT, env_choice("FUSED_OPT_CUDA"), DEFAULT_CUDA_ARCHS)
        if cuda is not None:
            extension, cuda_version, archs = cuda
            ext_modules.append(extension)
            info.update(cuda_version=cuda_version, cuda_archs=archs)
        cmdclass["build_ext"] = with_isa_objects(BuildExtension).with_options(
            no_python_abi_suffix=False
        )
        # The binary works only with the torch minor it was compiled against.
        install_requires = [f"torch=={torch_minor(torch.__version__)}.*"]
        if not from_sdist():
            label = local_version_label(torch.__version__, info["cuda_version"])
            version = f"{VERSION}+{label}"
            info["version"] = version

    write_build_info(info)
    setup(
        version=version,
        install_requires=install_requires,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
