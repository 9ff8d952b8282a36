"""Functional API: one fused step over lists of tensors, grouped by (device, dtype).

The optimizer classes cache the grouping across steps and call ``kernel()``'s choice directly;
``sgd()`` and ``adam()`` are the stateless entry points for custom loops.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _backends, _ops, _torch_kernels

__all__ = ["adam", "kernel", "sgd"]


# Bound once: each step asks, and looking it up through the torch module costs microseconds
# when a backward pass has left the interpreter's data out of the caches.
_is_compiling = torch.compiler.is_compiling


def _observed() -> bool:
    """Whether something may be watching op calls: tracing, a mode, the profiler, a
    RecordFunction callback. Tracing is asked first: under torch.compile the rest is not run."""
    if _is_compiling():
        return True
    direct = _ops.DIRECT
    if direct is not None:
        return direct.observed()  # the checks below and RecordFunction callbacks, in one call
    return (
        torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._autograd._profiler_enabled()
    )


class _DirectInEager:
    """The C++ kernel called straight from Python when nobody is watching, else the op.

    Both run the same code; the direct entry point reads the tensor lists without boxing each
    tensor for the dispatcher, which halves the cost of a step over many small tensors. Whenever
    the call may be observed (torch.compile, dispatch modes, the profiler) the op runs instead.
    """

    # The direct entry points take grads=None: each param's .grad, read in C++ (they return
    # False, changing nothing, when some param has none or is a subclass).
    reads_grads = True

    def __init__(self, direct: Callable[..., bool | None], op: Any) -> None:
        self.direct = direct
        self.op = op
        # The direct entry point takes the op's keyword-only arguments positionally, all given.
        self.positional = operator.itemgetter(*hyper_names(op))

    def __call__(self, *tensor_lists: list[Tensor] | None, **hyper: Any) -> bool | None:
        if _observed():
            if tensor_lists[1] is None:  # grads to read: the caller reads them for the op
                return False
            return self.op(*tensor_lists, **hyper)
        return self.direct(*tensor_lists, *self.positional(hyper))


class _CountedInEager:
    """The op called below its ADInplaceOrView kernel in eager mode, the in-place updates
    counted here (_ops.count_updates): that kernel, in Python, would convert every argument to
    the dispatcher's form a second time, a quarter of a step over thousands of small tensors
    where no accelerator serves the cpp backend. Traced, the op runs as it is."""

    reads_grads = False

    def __init__(self, op: Any, written: tuple[int, ...]) -> None:
        self.op = op
        self.written = written

    def __call__(self, *tensor_lists: list[Tensor], **hyper: Any) -> None:
        if _is_compiling():
            return self.op(*tensor_lists, **hyper)
        return _ops.count_updates(self.op, self.written, tensor_lists, hyper)


@functools.cache
def list_names(op: str) -> tuple[str, ...]:
    """The names of the tensor lists ``op`` ("sgd_" or "adam_") takes after ``params``, in the
    schema's order: how its checks name them."""
    schema = getattr(torch.ops.fused_opt, op).default._schema
    return tuple(arg.name for arg in schema.arguments if not arg.kwarg_only)[1:]


def hyper_names(op: Any) -> tuple[str, ...]:
    """The keyword-only arguments of ``op`` (an overload of fused_opt's ops), in the schema's
    order: the order in which the direct entry points take them."""
    return tuple(arg.name for arg in op._schema.arguments if arg.kwarg_only)


def grads_of(params: list[Tensor]) -> tuple[list[Tensor | None], list[int]]:
    """``[p.grad for p in params]`` and the indices of the params whose grad is None.

    In eager mode one C++ call when the CPU library is loaded: after a backward pass the params'
    metadata is out of the caches and reading each ``.grad`` costs several cache misses, which
    the C++ loop overlaps across params (about a third of the time on thousands of params).
    Under tracing or a mode the attribute is read as usual.
    """
    direct = _ops.direct_module()
    if direct is None or _observed():
        grads = [p.grad for p in params]
        return grads, [i for i, g in enumerate(grads) if g is None]
    return direct.grads_of(params)


def kernel(
    op: str, backend: str, device: torch.device, overload: str = "default"
) -> Callable[..., bool | None]:
    """What runs ``op`` ("sgd_" or "adam_") in ``overload`` ("default", "tensor_lr" or, for
    Adam, "tensor_hyper": see hyper_for) for ``backend`` on ``device``.

    The dispatcher's op, resolved to its overload up front (resolving it per call costs more
    than the step on small tensors); for the cpp backend, its direct entry point in eager mode.
    When the torch backend is forced on a device that has a compiled kernel, the pure-PyTorch
    kernel is called directly.
    """
    if backend == "torch" and _ops.kernel_registered(device.type):
        return getattr(_torch_kernels, op)
    resolved = getattr(getattr(torch.ops.fused_opt, op), overload)
    if backend == "cpp" and not torch.compiler.is_compiling():
        direct = _ops.direct_module()
        if direct is not None:
            return _DirectInEager(getattr(direct, op), resolved)
        return _CountedInEager(resolved, _ops.WRITTEN[op])
    return resolved


def _on_a_device(value: Any) -> bool:
    return isinstance(value, Tensor) and value.device.type != "cpu"


def lr_for(
    device: torch.device, value: float | Tensor, moved: dict, name: str = "lr"
) -> float | Tensor:
    """An lr (or another hyper-parameter) ``value`` as a kernel on ``device`` reads it: a
    tensor on another device than ``device`` moved there once per step (``moved[name]`` keeps
    the copy); a float or CPU tensor as it is (read on the host). Without this a second
    device's kernel would refuse it after the first had stepped."""
    if not _on_a_device(value):
        return value
    return on_device(value, device, moved.setdefault(name, {}))


def hyper_for(device: torch.device, lr: float | Tensor, beta1: float | Tensor,
              beta2: float | Tensor, weight_decay: float | Tensor,
              moved: dict) -> tuple[str, tuple]:  # fmt: skip
    """The adam_ overload for a kernel on ``device``, and its (lr, beta1, beta2, weight_decay).

    Betas or a weight decay that are tensors on a GPU go to "tensor_hyper" as tensors on
    ``device`` (copied there once per step, kept in ``moved``), which the CUDA kernels read on
    the device: no host sync, and a capturable step stays capturable. Otherwise they are floats
    (a CPU tensor is read without a sync) and lr picks "tensor_lr" or "default".
    """
    if device.type == "cpu" or not (
        _on_a_device(beta1) or _on_a_device(beta2) or _on_a_device(weight_decay)
    ):
        lr = lr_for(device, lr, moved)
        overload = "tensor_lr" if isinstance(lr, Tensor) else "default"
        return overload, (lr, float(beta1), float(beta2), float(weight_decay))
    values = []
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2),
                        ("weight_decay", weight_decay)):  # fmt: skip
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value), dtype=torch.float64)  # read on the host
        elif value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # the kernels read fp32 or fp64; a cast on its own device
        values.append(lr_for(device, value, moved, name))
    return "tensor_hyper", tuple(values)


def on_device(t: Tensor | None, device: torch.device, cache: dict) -> Tensor | None:
    """A step's scalar tensor (GradScaler's grad_scale / found_inf, a tensor lr) moved to
    ``device`` once per step. To the CPU the copy blocks: the C++ kernels read it at once."""
    if t is None or t.device == device:
        return t
    if device not in cache:
        cache[device] = t.to(device, non_blocking=device.type != "cpu")
    return cache[device]


def _grouped(tensor_lists: list[list[Tensor]], op: str) -> dict[tuple, list[list[Tensor]]]:
    """``op``'s lists split by (device, dtype) of the params."""
    lengths = [len(tensors) for tensors in tensor_lists]
    if lengths[1] != lengths[0] or any(n not in (0, lengths[0]) for n in lengths[2:]):
        raise RuntimeError(f"fused_opt: tensor lists of lengths {lengths} do not match params")
    groups: dict[tuple, list[list[Tensor]]] = {}
    for i, p in enumerate(tensor_lists[0]):
        lists = groups.setdefault((p.device, p.dtype), [[] for _ in tensor_lists])
        for out, tensors in zip(lists, tensor_lists, strict=True):
            if tensors:
                out.append(tensors[i])
    if len(groups) > 1:
        # Each kernel checks its own lists; check them all before the first one writes.
        for params, *others in groups.values():
            named = dict(zip(list_names(op), others, strict=True))
            _torch_kernels.check_tensor_lists("step", params, **named)
    return groups


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One SGD step over tensor lists (``momentum_buffers`` empty when momentum == 0)."""
    requested = _backends.normalize(backend)
    moved: dict[str, dict] = {"scale": {}, "inf": {}}
    for (device, _), (p, g, buf) in _grouped([params, grads, momentum_buffers], "sgd_").items():
        device_lr = lr_for(device, lr, moved)
        overload = "tensor_lr" if isinstance(device_lr, Tensor) else "default"
        kernel("sgd_", _backends.resolve(requested, device), device, overload)(
            p, g, buf, weight_decay=weight_decay, momentum=momentum, lr=device_lr,
            dampening=dampening, nesterov=nesterov, maximize=maximize,
            is_first_step=is_first_step,
            grad_scale=on_device(grad_scale, device, moved["scale"]),
            found_inf=on_device(found_inf, device, moved["inf"]),
        )  # fmt: skip


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float | Tensor = 0.9,
    beta2: float | Tensor = 0.999,
    weight_decay: float | Tensor = 0.0,
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One Adam (or, with ``decoupled_weight_decay``, AdamW) step over tensor lists."""
    requested = _backends.normalize(backend)
    moved: dict[str, Any] = {"scale": {}, "inf": {}}
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]
    for (device, _), (p, g, m, v, vmax, s) in _grouped(lists, "adam_").items():
        overload, (lr_, beta1_, beta2_, wd) = hyper_for(device, lr, beta1, beta2, weight_decay,
                                                        moved)  # fmt: skip
        kernel("adam_", _backends.resolve(requested, device), device, overload)(
            p, g, m, v, vmax, s, lr=lr_, beta1=beta1_, beta2=beta2_, weight_decay=wd,
            eps=eps, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            grad_scale=on_device(grad_scale, device, moved["scale"]),
            found_inf=on_device(found_inf, device, moved["inf"]),
        )  # fmt: skip
