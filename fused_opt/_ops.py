"""The op layer: schemas, fake kernels, the pure-PyTorch kernels and the compiled libraries.

Every optimizer step goes through two custom ops, ``fused_opt::sgd_`` and ``fused_opt::adam_``,
shaped like aten's ``_fused_sgd_`` / ``_fused_adamw_``. Their schemas live here, in Python, so the
ops exist on every install. The pure-PyTorch kernels (``_torch_kernels``) are registered as the
default implementation for every device; the compiled libraries, when they load, override the
CPU and CUDA keys with the C++ and CUDA kernels. ``torch.compile`` sees each op as one opaque
node thanks to the fake kernels below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import struct
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import _torch_kernels

__all__ = [
    "BUILD_INFO",
    "COMPILED",
    "LOAD_ERRORS",
    "OVERLOADS",
    "DamagedBinaryError",
    "FallbackWarning",
    "check_elf",
    "cuda_problem",
    "cuda_ready",
    "kernel_registered",
    "native_module",
    "direct_module",
    "divide_by_constant",
    "stream_pass",
]

_LIB = torch.library.Library("fused_opt", "DEF")

# Mutable lists are marked (x!); grads are read only (unscaled in registers, never written).
# `steps` is mutated: the kernel adds 1 to every step count unless found_inf is set.
_SGD_ARGS = (
    "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, float weight_decay, "
    "float momentum, {lr} lr, float dampening, bool nesterov, bool maximize, bool is_first_step, "
    "Tensor? grad_scale=None, Tensor? found_inf=None"
)
_ADAM_ARGS = (
    "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, {lr} lr, {hyper} beta1, "
    "{hyper} beta2, {hyper} weight_decay, float eps, bool amsgrad, bool maximize, "
    "bool decoupled_weight_decay, Tensor? grad_scale=None, Tensor? found_inf=None"
)

# Overloads: a float lr, a tensor lr and, for Adam, tensor lr, betas and weight decay (which
# the CUDA kernels read on the device: a capturable step with device betas never syncs).
_OVERLOADS = {"": ("float", "float"), ".tensor_lr": ("Tensor", "float")}
_OPS = {
    "sgd_": (_SGD_ARGS, _torch_kernels.sgd_, _OVERLOADS),
    "adam_": (_ADAM_ARGS, _torch_kernels.adam_, {**_OVERLOADS, ".tensor_hyper": ("Tensor",) * 2}),
}

# Each op's overload names, as torch.ops spells them ("default", "tensor_lr", ...).
OVERLOADS = {
    name: tuple(overload[1:] or "default" for overload in overloads)
    for name, (_, _, overloads) in _OPS.items()
}

for _name, (_args, _kernel, _overloads) in _OPS.items():
    for _overload, (_lr_type, _hyper_type) in _overloads.items():
        _LIB.define(f"{_name}{_overload}({_args.format(lr=_lr_type, hyper=_hyper_type)}) -> ()")
        _qualname = f"fused_opt::{_name}{_overload}"
        # The pure-PyTorch kernel serves every device that has no compiled kernel.
        _LIB.impl(f"{_name}{_overload}", _kernel, "CompositeExplicitAutograd")
        # In-place ops with no outputs: the fake kernel has nothing to compute.
        torch.library.register_fake(_qualname, lambda *args, **kwargs: None, lib=_LIB)


# The positions of each op's mutable tensor lists.
WRITTEN = {"sgd_": (0, 2), "adam_": (0, 2, 3, 4, 5)}


def count_updates(op: Any, written: tuple[int, ...], args: tuple, kwargs: dict) -> None:
    """Runs ``op`` below the ADInplaceOrView key, then counts the in-place update of every
    tensor of the mutable lists at positions ``written`` for autograd's saved-tensor checks, as
    torch's own in-place ops do. The compiled kernels cannot (torch's stable ABI has no version
    counters); counting twice, as the torch backend's own in-place ops then do, is harmless. A
    step that a CPU found_inf skipped changes nothing, versions included; a device found_inf is
    not read (that would wait for the device), nor a traced one (a fake or functional tensor has
    no value), so their steps count."""
    with torch._C._AutoDispatchBelowADInplaceOrView():
        op(*args, **kwargs)
    found_inf = kwargs.get("found_inf")
    if (
        type(found_inf) is torch.Tensor
        and found_inf.device.type == "cpu"
        and not torch._is_functional_tensor(found_inf)
        and found_inf.item() != 0
    ):
        return
    _increment_versions([t for i in written for t in args[i]])


def _increment_versions(tensors: list[torch.Tensor]) -> None:
    """torch._C._increment_version over a list: one call from torch 2.5 on, one per tensor on
    torch 2.4 (the pure-Python install's oldest)."""
    if _VERSIONS_BY_LIST:
        torch._C._increment_version(tensors)
    else:
        for t in tensors:
            torch._C._increment_version(t)


try:
    torch._C._increment_version([])
    _VERSIONS_BY_LIST = True
except TypeError:
    _VERSIONS_BY_LIST = False


def _count_updates(op: Any, written: tuple[int, ...]) -> Callable[..., None]:
    """The ADInplaceOrView kernel of ``op``: see count_updates."""
    return lambda *args, **kwargs: count_updates(op, written, args, kwargs)


for _name, _written in WRITTEN.items():
    for _overload in _OPS[_name][2]:
        _resolved = getattr(getattr(torch.ops.fused_opt, _name), _overload[1:] or "default")
        _LIB.impl(f"{_name}{_overload}", _count_updates(_resolved, _written), "ADInplaceOrView")


class FallbackWarning(UserWarning):
    """The compiled kernels could not be loaded; the pure-PyTorch backend runs instead."""


def _read_build_info() -> dict[str, Any]:
    path = Path(__file__).with_name("_build_info.json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


BUILD_INFO: dict[str, Any] = _read_build_info()

# Which compiled libraries loaded ("cpp", "cuda") and why the others did not. "cuda" enters
# when a CUDA device is first asked for (cuda_ready): until then its module waits here.
COMPILED: dict[str, Any] = {}
LOAD_ERRORS: dict[str, str] = {}
_cuda_module: Any | None = None

_NATIVE_MODULES = {"cpp": "fused_opt._C", "cuda": "fused_opt._C_cuda"}
# The optional accelerator of the cpp backend (direct entry points; see csrc/direct), loaded
# only on the torch release it was built against; None where it did not load, and why.
_DIRECT_MODULE = "fused_opt._C_direct"
DIRECT: Any | None = None
DIRECT_NOTE = "not loaded"
_REMEDY = (
    "Rebuild it against the installed torch with `pip install --no-build-isolation -e .` "
    "(needs a C++ compiler), or install the wheel built for this torch. "
    "Set FUSED_OPT_BACKEND=torch to choose the pure-PyTorch backend and silence this warning."
)


class DamagedBinaryError(ImportError):
    """A compiled module's file is shorter than the segments its ELF headers say it loads."""


def check_elf(path: str | os.PathLike[str]) -> None:
    """Raise DamagedBinaryError unless ``path`` holds every loadable segment its ELF headers name.

    The dynamic loader maps segments without checking the file's length, and touching a page
    past the end of a truncated file (an interrupted copy, a partly synced network file system)
    kills the process with SIGBUS: the import must never get that far. Files that are not ELF
    (macOS, Windows) are left to the loader.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        ident = f.read(16)
        if not b"\x7fELF".startswith(ident[:4]):
            return
        if len(ident) < 16:
            raise DamagedBinaryError(f"{path} is truncated ({size} bytes)")
        is64 = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        header = f.read(48 if is64 else 36)
        header_format = order + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
        if len(header) < struct.calcsize(header_format):
            raise DamagedBinaryError(f"{path} is truncated in its ELF header ({size} bytes)")
        fields = struct.unpack(header_format, header)
        phoff, phentsize, phnum = fields[4], fields[8], fields[9]
        if phoff + phentsize * phnum > size:
            raise DamagedBinaryError(
                f"{path} is truncated: {size} bytes, its program headers end at "
                f"{phoff + phentsize * phnum}"
            )
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    end = 0
    for i in range(phnum):
        entry = table[i * phentsize : (i + 1) * phentsize]
        if is64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack(order + "IIQQQQ", entry[:40])
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack(order + "IIIII", entry[:20])
        if p_type == 1:  # PT_LOAD
            end = max(end, p_offset + p_filesz)
    if end > size:
        raise DamagedBinaryError(
            f"{path} is truncated: {size} bytes, but its loadable segments end at {end} "
            "(an interrupted copy or a partly synced file system?); reinstall fused_opt"
        )


def _shadowing_note() -> str | None:
    """Why no compiled module is found, when this is a source tree that hides an installed
    fused_opt (Python started in a checkout after a non-editable install): else None."""
    here = Path(__file__).resolve().parent
    try:
        installed = importlib.metadata.distribution("fused_opt").locate_file("fused_opt")
    except importlib.metadata.PackageNotFoundError:
        return None
    installed = Path(str(installed)).resolve()
    if installed == here or not (installed / "__init__.py").is_file():
        return None  # this is the installed package, or an editable install of this tree
    return (
        f"the source tree {here} shadows the installed fused_opt in {installed}: Python imports "
        "the unbuilt sources because it runs from (or has on sys.path) the checkout; run from "
        "another directory, or build the checkout with `pip install --no-build-isolation -e .`"
    )


def _import_native(module: str) -> Any:
    """Import a compiled module after checking its file (see check_elf)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(module)
    if spec.origin and os.path.isfile(spec.origin):
        check_elf(spec.origin)
    return importlib.import_module(module)


def _note_isa_request(native: Any) -> None:
    """Warn about a FUSED_OPT_CPU_ISA value this build or CPU cannot honour (the kernels chose the
    best supported variant): under ``-W error`` on stderr instead, so a bad value of the knob
    never fails ``import fused_opt``."""
    note = getattr(native, "isa_request_note", None)
    if not note:
        return
    try:
        warnings.warn(note, RuntimeWarning, stacklevel=4)
    except Warning:
        print(f"RuntimeWarning: {note}", file=sys.stderr)


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '2.14.0a0+git' -> (2, 14, 0)."""
    parts = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(p) for p in parts)


def _load_problem() -> str | None:
    """Why the compiled kernels must not be loaded under the running torch, or None.

    They use torch's stable ABI: any torch from the build's target version on runs them. A
    build without a target (before the stable ABI) works only with the torch minor it was
    compiled against, and can crash on load under another: never try it."""
    built_for = BUILD_INFO.get("torch_version")
    if not built_for:
        return None
    if target := BUILD_INFO.get("torch_target"):
        if _release(torch.__version__)[:2] < _release(target)[:2]:
            return (
                f"it needs torch >= {target} (the stable ABI it targets), not {torch.__version__}"
            )
        return None
    if _release(built_for)[:2] != _release(torch.__version__)[:2]:
        return f"it was built against torch {built_for} but torch {torch.__version__} is installed"
    return None


def _load_direct() -> None:
    """Load the accelerator where it matches the running torch release; else note why not."""
    global DIRECT, DIRECT_NOTE
    built_for = BUILD_INFO.get("torch_version", "")
    if os.environ.get("FUSED_OPT_DIRECT") == "0":  # benchmarks and tests of the stable path
        DIRECT_NOTE = "disabled by FUSED_OPT_DIRECT=0"
        return
    # Exactly that build: two nightlies or source builds of one release differ in layouts the
    # accelerator reads, and a mismatch there would not fail to load, it would crash.
    built_git = BUILD_INFO.get("torch_git_version")
    if built_for != torch.__version__ or built_git not in (None, torch.version.git_version):
        DIRECT_NOTE = f"built for torch {built_for}; torch {torch.__version__} runs"
        return
    try:
        DIRECT = _import_native(_DIRECT_MODULE)
        DIRECT_NOTE = "loaded"
    except ModuleNotFoundError:
        DIRECT_NOTE = f"not built for this Python ({platform.python_version()})"
    except Exception as exc:  # an undefined symbol of another torch build
        DIRECT_NOTE = f"{type(exc).__name__}: {exc}"


def _load_native() -> None:
    problem = _load_problem()
    for backend, module in _NATIVE_MODULES.items():
        if problem:
            LOAD_ERRORS[backend] = problem
            continue
        try:
            loaded = _import_native(module)
            if backend == "cuda":  # usable once a device is seen: see cuda_ready()
                global _cuda_module
                _cuda_module = loaded
            else:
                COMPILED[backend] = loaded
        except ModuleNotFoundError:
            LOAD_ERRORS[backend] = "not built"
            if not BUILD_INFO and (note := _shadowing_note()):
                LOAD_ERRORS[backend] = note
        except Exception as exc:  # ImportError, OSError (undefined symbols), RuntimeError
            LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
    if "cpp" in COMPILED:
        _note_isa_request(COMPILED["cpp"])
        _load_direct()


def _missing_reasons() -> list[str]:
    """Why compiled kernels that this machine could run are not running (empty: all is well)."""
    if BUILD_INFO.get("extensions") is False:
        return ["this install was built without compiled kernels (FUSED_OPT_BUILD_EXT=0)"]
    reasons = []
    if "cpp" not in COMPILED:
        reasons.append(f"the CPU kernels did not load ({LOAD_ERRORS.get('cpp', 'not built')})")
    if BUILD_INFO.get("cuda_version") and _cuda_module is None and _gpus_visible():
        reasons.append(f"the CUDA kernels did not load ({LOAD_ERRORS.get('cuda')})")
    return reasons


def _gpus_visible() -> bool:
    """Whether NVML sees a GPU: asked at import, where torch.cuda.is_available() would
    initialise the driver (a forked worker then cannot use CUDA). False if NVML cannot say."""
    count_nvml = getattr(torch.cuda, "_device_count_nvml", None)
    try:
        return count_nvml is not None and count_nvml() > 0
    except Exception:  # no NVML library, no driver
        return False


def _warn_if_missing() -> None:
    reasons = _missing_reasons()
    if not reasons or os.environ.get("FUSED_OPT_BACKEND", "").lower() == "torch":
        return
    warnings.warn(
        f"fused_opt: {'; '.join(reasons)}; the pure-PyTorch backend runs instead. {_REMEDY}",
        FallbackWarning,
        stacklevel=3,
    )


if os.environ.get("FUSED_OPT_DISABLE_NATIVE") == "1":
    # Used by the tests to exercise the fallback path in a fresh process.
    LOAD_ERRORS.update(dict.fromkeys(_NATIVE_MODULES, "disabled by FUSED_OPT_DISABLE_NATIVE=1"))
else:
    _load_native()
_warn_if_missing()


def native_module(backend: str) -> Any | None:
    """The loaded extension module of a compiled backend, or None."""
    if backend == "cuda":
        cuda_ready()
    return COMPILED.get(backend)


def direct_module() -> Any | None:
    """The cpp backend's accelerator (fused_opt._C_direct) where it loaded, else None."""
    return DIRECT


def _cpu_floats(t: torch.Tensor) -> bool:
    """Whether the compiled passes below may read ``t`` as plain fp32 memory."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def divide_by_constant(x: torch.Tensor, out: torch.Tensor, c: float) -> None:
    """out = x / c as the active SIMD variant's 16-bit Adam kernels divide (for the tests)."""
    for name, t in (("x", x), ("out", out)):
        if not _cpu_floats(t):
            raise ValueError(f"{name} must be a contiguous fp32 CPU tensor")
    if x.numel() != out.numel():
        raise ValueError("divide_by_constant: x and out must have one size")
    COMPILED["cpp"].divide_by_constant_at(x.data_ptr(), out.data_ptr(), x.numel(), c)


def stream_pass(arrays: list[torch.Tensor]) -> None:
    """The bandwidth floor's pass over 1 to 5 contiguous fp32 CPU tensors of one size, as the
    step's kernels stream memory (every array read, all but the second written back unchanged;
    finite data)."""
    if not isinstance(arrays, (list, tuple)) or not all(
        isinstance(t, torch.Tensor) for t in arrays
    ):
        raise TypeError("stream_pass: arrays must be a list of tensors")
    usable = 1 <= len(arrays) <= 5 and all(
        _cpu_floats(t) and t.numel() == arrays[0].numel() for t in arrays
    )
    if not usable:
        raise ValueError(
            "stream_pass: arrays must be 1 to 5 contiguous fp32 CPU tensors of one size"
        )
    COMPILED["cpp"].stream_pass_at([t.data_ptr() for t in arrays], arrays[0].numel())


def kernel_registered(device_type: str) -> bool:
    """Whether a compiled kernel serves the ops' dispatch key of ``device_type``: importing
    _C_cuda registers the CUDA kernels, whether or not a GPU is there to run them."""
    if device_type == "cuda":
        return _cuda_module is not None
    return device_type == "cpu" and "cpp" in COMPILED


def cuda_ready() -> bool:
    """Whether the CUDA kernels can run in this process: built, loaded and a CUDA device seen.

    Asked when something first needs CUDA, never at import: torch.cuda.is_available()
    initialises the driver, and a process forked after that cannot use CUDA (DataLoader
    workers, multiprocessing). Puts "cuda" in COMPILED, or its reason in LOAD_ERRORS.
    """
    if "cuda" in COMPILED:
        return True
    if _cuda_module is None or not torch.cuda.is_available():
        LOAD_ERRORS.setdefault("cuda", "no CUDA device is available")
        return False
    COMPILED["cuda"] = _cuda_module
    LOAD_ERRORS.pop("cuda", None)
    return True


# cuda:index -> why the CUDA kernels cannot run there (None: they can), asked once per device.
_DEVICE_PROBLEMS: dict[int, str | None] = {}


def cuda_problem(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on ``device`` (None: they can): the binary holds no code
    its GPU can run (no SASS for its arch, no PTX it can JIT). The first refusal on a device
    warns with a FallbackWarning; the optimizers then step that device with the torch backend,
    which a launch's "no kernel image is available" would otherwise have stopped."""
    if not cuda_ready():
        return LOAD_ERRORS.get("cuda", "not built")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_PROBLEMS:
        try:
            problem = COMPILED["cuda"].kernel_image_problem(index)
        except RuntimeError:
            # The runtime could not tell (out of memory, an earlier sticky error): ask again at
            # the next plan; the kernel reports the error itself if it persists.
            return None
        if problem is not None:
            major, minor = torch.cuda.get_device_capability(index)
            archs = ", ".join(BUILD_INFO.get("cuda_archs") or ["?"])
            problem = (
                f"the CUDA kernels hold no code for cuda:{index} "
                f"({torch.cuda.get_device_name(index)}, sm_{major}{minor}; built for {archs}): "
                f"{problem}"
            )
            warnings.warn(
                f"fused_opt: {problem}; the pure-PyTorch backend runs on that device instead. "
                f"Rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor} (or install a wheel built "
                "for it), or set FUSED_OPT_BACKEND=torch to silence this warning.",
                FallbackWarning,
                stacklevel=4,
            )
        _DEVICE_PROBLEMS[index] = problem
    return _DEVICE_PROBLEMS[index]
