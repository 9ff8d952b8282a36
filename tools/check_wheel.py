"""Check a fused_opt wheel before it ships: only the package's own files, and build info that
agrees with the wheel's name, version, requirements, tags and binaries.

    python tools/check_wheel.py wheelhouse/fused_opt-0.1.0-cp310-abi3-manylinux_2_28_x86_64.whl

A compiled wheel must be tagged cp310-abi3 (CPython's limited API), require torch>=<the stable
ABI target> and nothing that pins a torch release, and hold stable-ABI libraries (_C, _C_cuda)
that need no symbol of torch's C++ API and no libtorch_python, and no glibc (or libstdc++)
symbol version newer than its manylinux tag allows. A CUDA wheel carries the label of its CUDA
major (0.1.0+cu13) and SASS for every arch its build info names.

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
CPU_LIBRARY = "fused_opt/_C.abi3.so"
CUDA_LIBRARY = "fused_opt/_C_cuda.abi3.so"
# The optional accelerator: torch's C++ API and one Python (loaded only where both match).
DIRECT_LIBRARY = "fused_opt/_C_direct.cpython-*.so"
ABI3_TAG = "cp310-abi3"
# The newest libstdc++ symbol versions each manylinux glibc floor allows (auditwheel's policy).
CXX_FLOORS = {17: ("3.4.19", "1.3.7"), 28: ("3.4.24", "1.3.11"), 31: ("3.4.28", "1.3.12"),
              34: ("3.4.29", "1.3.13")}  # fmt: skip
# Symbols of torch's C++ API (at::, c10::, torch::), which a stable-ABI library must not need.
# (Functions and objects, and the vtables and type info of their classes.)
TORCH_CXX_SYMBOL = re.compile(r"^_Z(?:T[VIS])?N[KVRLO]*(?:2at|3c10|5torch)")
# The legacy names of the oldest manylinux floors.
LEGACY_TAGS = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
DIST_INFO_FILES = ("METADATA", "WHEEL", "RECORD", "top_level.txt", "LICENSE*", "licenses/*")
MINIMUM_TORCH = "torch>=2.4"
# ELF e_machine values, by the arch name platform tags use.
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i686", 21: "ppc64le", 22: "s390x"}


def expected_label(info: dict) -> str | None:
    """The local version label setup.py gives a CUDA build from a checkout: its CUDA major."""
    cuda = info.get("cuda_version")
    return f"cu{cuda.split('.')[0]}" if cuda else None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


class Elf:
    """What the checks need of a 64-bit little-endian ELF library: its libraries (DT_NEEDED),
    the symbol versions it needs (.gnu.version_r) and its undefined dynamic symbols."""

    def __init__(self, binary: bytes) -> None:
        self.binary = binary
        if binary[:4] != b"\x7fELF" or binary[4] != 2 or binary[5] != 1:
            raise ValueError("not a 64-bit little-endian ELF file")
        (shoff,) = struct.unpack_from("<Q", binary, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", binary, 0x3A)
        headers = [struct.unpack_from("<IIQQQQIIQQ", binary, shoff + i * shentsize)
                   for i in range(shnum)]  # fmt: skip
        (machine,) = struct.unpack_from("<H", binary, 0x12)
        self.machine = ELF_MACHINES.get(machine, f"e_machine {machine}")
        names_at = headers[shstrndx][4]
        self.sections = {self._string(names_at, h[0]): h for h in headers}
        self.by_index = headers

    def _string(self, table: int, offset: int) -> str:
        end = self.binary.index(b"\0", table + offset)
        return self.binary[table + offset : end].decode()

    def _strings_of(self, section: tuple) -> int:
        return self.by_index[section[6]][4]  # sh_link: the string table's offset

    def needed(self) -> list[str]:
        dynamic = self.sections.get(".dynamic")
        if dynamic is None:
            return []
        strings = self._strings_of(dynamic)
        names = []
        for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
            tag, value = struct.unpack_from("<qQ", self.binary, at)
            if tag == 1:  # DT_NEEDED
                names.append(self._string(strings, value))
        return names

    def version_needs(self) -> dict[str, set[str]]:
        """{library: {"GLIBC_2.14", ...}} from .gnu.version_r."""
        section = self.sections.get(".gnu.version_r")
        needs: dict[str, set[str]] = {}
        if section is None:
            return needs
        strings = self._strings_of(section)
        at = section[4]
        while True:
            _, count, file_name, aux, following = struct.unpack_from("<HHIII", self.binary, at)
            versions = needs.setdefault(self._string(strings, file_name), set())
            entry = at + aux
            for _ in range(count):
                _, _, _, name, next_entry = struct.unpack_from("<IHHII", self.binary, entry)
                versions.add(self._string(strings, name))
                entry += next_entry
            if following == 0:
                return needs
            at += following

    def undefined_symbols(self) -> list[str]:
        section = self.sections.get(".dynsym")
        if section is None:
            return []
        strings = self._strings_of(section)
        names = []
        for at in range(section[4], section[4] + section[5], 24):
            name, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", self.binary, at)
            if shndx == 0 and name:
                names.append(self._string(strings, name))
        return names


def elf_problems(
    name: str, binary: bytes, glibc_floor: int | None, stable: bool, arch: str | None = None
) -> list[str]:
    """What keeps the library ``name`` from its wheel's promises: the CPU ``arch`` of its tag,
    the glibc floor 2.<glibc_floor> of a manylinux tag (None: no tag claims one) and, for the
    stable-ABI libraries, no torch C++ symbols and no libtorch_python."""
    try:
        elf = Elf(binary)
    except (ValueError, struct.error, IndexError) as error:
        return [f"{name}: unreadable ELF ({error})"]
    problems = []
    if arch is not None and elf.machine != arch:
        problems.append(f"{name} is {elf.machine} code in a wheel tagged {arch}")
    if stable:
        if "libtorch_python.so" in elf.needed():
            problems.append(f"{name} links libtorch_python.so: not on the stable ABI")
        cxx = [s for s in elf.undefined_symbols() if TORCH_CXX_SYMBOL.match(s)]
        if cxx:
            problems.append(f"{name} needs {len(cxx)} symbols of torch's C++ API, e.g. {cxx[0]}")
    if glibc_floor is None:
        return problems
    limits = {"GLIBC": f"2.{glibc_floor}"}
    if glibc_floor in CXX_FLOORS:
        limits["GLIBCXX"], limits["CXXABI"] = CXX_FLOORS[glibc_floor]
    for library, versions in sorted(elf.version_needs().items()):
        for version in sorted(versions):
            prefix, _, number = version.partition("_")
            if prefix in limits and number[:1].isdigit():
                if _version_key(number) > _version_key(limits[prefix]):
                    problems.append(
                        f"{name} needs {version} ({library}), newer than manylinux_2_{glibc_floor} "
                        f"allows ({prefix}_{limits[prefix]})"
                    )
    return problems


def platform_problems(tags: list[str]) -> tuple[list[str], int | None]:
    """(problems, glibc floor) of a compiled wheel's tags: each cp310-abi3, on one platform,
    manylinux_2_X (floor X) or a plain linux_* tag (no floor claimed)."""
    problems = []
    floors = set()
    for tag in tags:
        python_abi, _, plat = tag.rpartition("-")
        if python_abi != ABI3_TAG:
            problems.append(f"tag {tag} is not {ABI3_TAG}: the binaries use the limited API")
        match = re.fullmatch(r"manylinux_2_(\d+)_\w+", plat)
        legacy = re.fullmatch(r"(manylinux\w*?)_(?:x86_64|aarch64|i686|ppc64le|s390x)", plat)
        if match:
            floors.add(int(match.group(1)))
        elif legacy and legacy.group(1) in LEGACY_TAGS:
            floors.add(LEGACY_TAGS[legacy.group(1)])
        elif not plat.startswith("linux_"):
            problems.append(f"tag {tag}: unknown platform {plat}")
    return problems, min(floors) if floors else None


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
        allowed += [CPU_LIBRARY, DIRECT_LIBRARY]
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

    for key in ("torch_version", "torch_target", "compiler", "cpu_isas", "cuda_archs"):
        if key not in info:
            problems.append(f"build info lacks {key}")
    if "torch_target" not in info:
        return problems
    needed = f"torch>={info['torch_target']}"
    if requires != [needed]:
        problems.append(
            f"the stable ABI of torch {info['torch_target']}: should require {needed} (any later "
            f"torch runs it, none is pinned), not {requires}"
        )
    label = version.split("+")[1] if "+" in version else None
    if label != expected_label(info) and not (label is None and info.get("from_sdist")):
        problems.append(f"local version label {label}, expected {expected_label(info)}")
    tag_problems, glibc_floor = platform_problems(tags)
    problems += tag_problems
    archs = {re.sub(r"^(?:manylinux_\d+_\d+|manylinux\w*?|linux)_", "", t.rpartition("-")[2])
             for t in tags}  # fmt: skip
    arch = archs.pop() if len(archs) == 1 else None
    if len(archs) > 1:
        problems.append(f"tags for more than one arch: {sorted(archs)}")
    if arch and info.get("target_arch", arch) != arch:
        problems.append(f"built for {info['target_arch']}, tagged {arch}")
    with zipfile.ZipFile(path) as wheel:
        for name in names:
            if name.endswith(".so"):
                stable = fnmatch.fnmatch(name, CPU_LIBRARY) or fnmatch.fnmatch(name, CUDA_LIBRARY)
                problems += elf_problems(name, wheel.read(name), glibc_floor, stable, arch)
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
