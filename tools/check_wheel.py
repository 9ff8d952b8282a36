"""Check a fused_opt wheel before it ships: only the package's own files, and build info that
agrees with the wheel's name, version, requirements and binaries.

    python tools/check_wheel.py dist/fused_opt-0.1.0+torch2.13cpu-cp311-cp311-linux_x86_64.whl

Prints the build info and every problem found; exits 1 when there is one. tests/test_wheel.py
and tools/build_wheel.sh use it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

PACKAGE = "fused_opt"
# Everything a wheel may hold; the compiled libraries only when the build info says so.
PURE_FILES = ("fused_opt/*.py", "fused_opt/optim/*.py", "fused_opt/py.typed")
BUILD_INFO = "fused_opt/_build_info.json"
CPU_LIBRARY = "fused_opt/_C.*so"  # _C.cpython-311-x86_64-linux-gnu.so or _C.abi3.so
CUDA_LIBRARY = "fused_opt/_C_cuda.*so"
DIST_INFO_FILES = ("METADATA", "WHEEL", "RECORD", "top_level.txt", "LICENSE*", "licenses/*")
MINIMUM_TORCH = "torch>=2.4"


def torch_minor(torch_version: str) -> str:
    return ".".join(torch_version.split("+")[0].split(".")[:2])


def expected_label(info: dict) -> str:
    """The local version label setup.py gives a build from a checkout (see its docstring)."""
    cuda = info.get("cuda_version")
    accelerator = "cu" + "".join(cuda.split(".")[:2]) if cuda else "cpu"
    return f"torch{torch_minor(info['torch_version'])}{accelerator}"


def read_wheel(path: Path) -> tuple[list[str], dict, dict, list[str], str]:
    """(member names, build info, METADATA headers, Requires-Dist lines, WHEEL text)."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        info = json.loads(wheel.read(BUILD_INFO)) if BUILD_INFO in names else {}
        dist_info = next((n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")), "")
        metadata = HeaderParser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        wheel_text = wheel.read(f"{dist_info}/WHEEL").decode()
        init_file = "fused_opt/__init__.py"
        init = wheel.read(init_file).decode() if init_file in names else ""
    requires = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    headers = {"Name": metadata["Name"], "Version": metadata["Version"], "__init__": init}
    return names, info, headers, requires, wheel_text


def stray_files(names: list[str], info: dict) -> list[str]:
    allowed = list(PURE_FILES) + [BUILD_INFO]
    allowed += [f"{PACKAGE}-*.dist-info/{pattern}" for pattern in DIST_INFO_FILES]
    if info.get("extensions"):
        allowed.append(CPU_LIBRARY)
    if info.get("cuda_version"):
        allowed.append(CUDA_LIBRARY)
    return [
        name
        for name in names
        if not name.endswith("/") and not any(fnmatch.fnmatch(name, p) for p in allowed)
    ]


_FATBIN_MAGIC = 0xBA55ED50


def cuda_archs_in(binary: bytes) -> tuple[set[int], set[int]]:
    """The archs (as 90 for sm_90) an ELF library's CUDA fat binaries hold machine code (SASS)
    and PTX for, read from its .nv_fatbin section: no cuobjdump needed (not every toolkit has
    one). A fat binary is a header (magic, version, header size, payload size) and entries,
    each with its own header: kind (1 PTX, 2 ELF), sizes, and the arch as an integer."""
    sass: set[int] = set()
    ptx: set[int] = set()
    if binary[:4] != b"\x7fELF" or binary[4] != 2:  # 64-bit ELF only
        return sass, ptx
    (shoff,) = struct.unpack_from("<Q", binary, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", binary, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", binary, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name, _, _, _, offset, size in sections:
        end = binary.index(b"\0", names_offset + name)
        if binary[names_offset + name : end] != b".nv_fatbin":
            continue
        at = offset
        while at + 16 <= offset + size:
            magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", binary, at)
            if magic != _FATBIN_MAGIC:
                at += 8  # containers are 8-byte aligned; skip padding
                continue
            entry = at + header_size
            while entry < at + header_size + fat_size:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", binary, entry)
                (arch,) = struct.unpack_from("<I", binary, entry + 28)
                (ptx if kind == 1 else sass).add(arch)
                entry += entry_header + payload
            at += header_size + fat_size
    return sass, ptx


def cuda_arch_problems(name: str, binary: bytes, archs: list[str]) -> list[str]:
    """Whether the CUDA library ``binary`` (called ``name``) holds SASS for every arch of the
    build info's ``archs`` ("9.0", "12.0+PTX"), and PTX for those marked +PTX."""
    sass, ptx = cuda_archs_in(binary)
    problems = []
    for arch in archs:
        code = int(re.sub(r"[^0-9]", "", arch.removesuffix("+PTX")))
        if code not in sass:
            problems.append(f"{name} holds no SASS for sm_{code}, which the build info names")
        if arch.endswith("+PTX") and code not in ptx:
            problems.append(f"{name} holds no PTX for compute_{code} ({arch})")
    return problems


def _cuda_arch_problems(path: Path, names: list[str], info: dict) -> list[str]:
    library = next((n for n in names if fnmatch.fnmatch(n, CUDA_LIBRARY)), None)
    if library is None:
        return []
    with zipfile.ZipFile(path) as wheel:
        return cuda_arch_problems(library, wheel.read(library), info.get("cuda_archs", []))


def check_wheel(path: Path) -> list[str]:
    """Every problem with the wheel at `path`, as sentences; empty when it is fit to ship."""
    names, info, headers, requires, wheel_text = read_wheel(path)
    problems = [f"stray file in the wheel: {name}" for name in stray_files(names, info)]
    if not info:
        return problems + [f"no {BUILD_INFO} in the wheel"]

    version = headers["Version"]
    file_version = path.name.split("-")[1]
    if file_version != version.replace("-", "_"):
        problems.append(f"file name says version {file_version}, METADATA says {version}")
    if info.get("version") != version:
        problems.append(f"build info says version {info.get('version')}, METADATA says {version}")
    base_version = version.split("+")[0]
    match = re.search(r'^__version__ = "([^"]+)"', headers["__init__"], re.MULTILINE)
    if match and match.group(1) != base_version:
        problems.append(f"fused_opt.__version__ is {match.group(1)}, the wheel is {base_version}")
    tags = re.findall(r"^Tag: (.+)$", wheel_text, re.MULTILINE)

    if not info.get("extensions"):
        if any(fnmatch.fnmatch(n, "*.so") for n in names):
            problems.append("a pure-Python wheel holds a compiled library")
        if requires != [MINIMUM_TORCH]:
            problems.append(f"a pure-Python wheel should require {MINIMUM_TORCH}, not {requires}")
        if tags != ["py3-none-any"]:
            problems.append(f"a pure-Python wheel should be tagged py3-none-any, not {tags}")
        return problems

    for key in ("torch_version", "compiler", "cpu_isas", "cuda_archs"):
        if key not in info:
            problems.append(f"build info lacks {key}")
    if "torch_version" not in info:
        return problems
    needed = f"torch=={torch_minor(info['torch_version'])}.*"
    if requires != [needed]:
        built_for = info["torch_version"]
        problems.append(f"built against torch {built_for}: should require {needed}, not {requires}")
    label = version.split("+")[1] if "+" in version else None
    if label is not None and label != expected_label(info):
        problems.append(f"local version label {label}, expected {expected_label(info)}")
    if not any(fnmatch.fnmatch(n, CPU_LIBRARY) for n in names):
        problems.append("build info says compiled, but the wheel has no fused_opt/_C library")
    if info.get("cpu_isas", [None])[0] != "baseline":
        problems.append(f"CPU SIMD variants {info.get('cpu_isas')} lack the portable baseline")
    if info.get("cuda_version"):
        if not any(fnmatch.fnmatch(n, CUDA_LIBRARY) for n in names):
            problems.append("build info names a CUDA version, but the wheel has no _C_cuda library")
        if not info.get("cuda_archs"):
            problems.append("a CUDA build with no CUDA archs recorded")
        problems += _cuda_arch_problems(path, names, info)
    if any(tag.endswith("-any") for tag in tags):
        problems.append(f"a wheel with compiled code tagged {tags}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    path = Path(argv[0])
    _, info, headers, requires, _ = read_wheel(path)
    print(f"{path.name}: {headers['Name']} {headers['Version']}, requires {', '.join(requires)}")
    print("build info: " + json.dumps(info, sort_keys=True))
    problems = check_wheel(path)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("wheel check: " + (f"{len(problems)} problem(s)" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
