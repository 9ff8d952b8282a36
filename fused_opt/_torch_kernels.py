"""Pure-PyTorch kernels of the fused ops: the ``torch`` backend and the fallback on every device.

Where torch's own fused CPU kernels give torch.optim's results (see _TORCH_FUSED_DTYPES) they
run: torch.optim's fastest mode. Low-precision SGD on the CPU, where torch's kernel is wrong,
runs that fp32 kernel on fp32 copies (_sgd_in_fp32). Elsewhere the code follows torch.optim's
foreach implementation op for op, with one difference shared by all our backends: fp16/bf16
tensors are computed in fp32 and rounded once on store, as the fused kernels do, instead of
being rounded after every op. Inputs are checked before anything is modified.

On the CPU the foreach code and the fp32 copies go in blocks of about _BLOCK_ELEMENTS elements
per tensor list, a large tensor cut into parts: each foreach op is a pass over its tensors, and
over a block that stays in the caches the dozen passes of an Adam step read memory about once.
The fp32 working copies of low-precision tensors are then small allocations the heap reuses,
where whole-tensor copies were fresh pages at every step. Every element gets the same
arithmetic whatever the blocks."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_is_compiling = torch.compiler.is_compiling
# Per tensor list: 1 MB of fp32. An Adam block, its working copies and temporaries stay in L2/L3.
_BLOCK_ELEMENTS = 1 << 18
# A multiple of every SIMD width in floats (and of a cache line): see _sgd_in_fp32.
_PAD_ELEMENTS = 64
# A list of contiguous tensors as one vector, and back as views shaped like them, in C++: a
# Python view per tensor costs about 1 us.
_flatten = torch._C._nn.flatten_dense_tensors
_unflatten = torch._C._nn.unflatten_dense_tensors


_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_shape_of = operator.attrgetter("shape")


def _uniform(params: list[Tensor], lists: dict[str, list[Tensor]]) -> bool:
    """Whether every list (``steps`` aside) is as long as ``params`` and, with it, holds
    contiguous tensors of one float dtype on one device, shaped like ``params`` index by index:
    the usual case, told in a few C-level passes (no Python code per tensor; 2000 small params
    of an Adam step: 1.5 ms less than a loop). Contiguous implies strided (a sparse tensor is
    not)."""
    others = [ts for name, ts in lists.items() if name != "steps" and (ts or name == "grads")]
    if not params or any(len(ts) != len(params) for ts in others):
        return False
    if len(lists.get("steps", ())) not in (0, len(params)):
        return False
    everything = list(itertools.chain(params, *others))
    if len(set(map(_dtype_of, everything))) != 1 or not params[0].is_floating_point():
        return False
    if params[0].is_cpu:  # no device object made per tensor: 2x faster than comparing them
        if not all(map(_is_cpu, everything)):
            return False
    elif len(set(map(_device_of, everything))) != 1:
        return False
    if not all(map(Tensor.is_contiguous, everything)):
        return False
    shapes = list(map(_shape_of, params))
    return all(list(map(_shape_of, ts)) == shapes for ts in others)


def check_tensor_lists(op: str, params: list[Tensor], **lists: list[Tensor]) -> bool:
    """Raise RuntimeError unless every list matches ``params`` (the checks all kernels share);
    return whether they are uniform (see _uniform; dynamo traces the loop below instead)."""
    if not _is_compiling() and _uniform(params, lists):
        return True
    for name, tensors in lists.items():
        if len(tensors) not in (0, len(params)) or (
            name == "grads" and len(tensors) != len(params)
        ):
            raise RuntimeError(f"fused_opt.{op}: expected {len(params)} {name}, got {len(tensors)}")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise RuntimeError(f"fused_opt.{op}: params[{i}] has dtype {p.dtype}, not a float type")
        for name, tensors in lists.items():
            if not tensors or name == "steps":
                continue
            t = tensors[i]
            if t.layout != torch.strided:
                raise RuntimeError(
                    f"fused_opt.{op}: {name}[{i}] is {t.layout}; sparse gradients are not supported"
                )
            if t.shape != p.shape or t.device != p.device:
                raise RuntimeError(
                    f"fused_opt.{op}: {name}[{i}] has shape {tuple(t.shape)} on {t.device}, "
                    f"expected {tuple(p.shape)} on {p.device} like params[{i}]"
                )
            if t.dtype != p.dtype:
                raise RuntimeError(
                    f"fused_opt.{op}: {name}[{i}] has dtype {t.dtype}, "
                    f"expected {p.dtype} like params[{i}]"
                )
    return False


# Where torch's own fused kernels give torch.optim's results, by (op, device type): the dtypes.
# torch 2.13's fused CPU SGD leaves bf16/fp16 params unchanged but for each one's last
# (numel % 32) elements; every fused CPU kernel is wrong on params that are not dense (a
# strided slice). There, and on other devices (on CUDA a non-capturable Adam keeps its steps on
# the CPU, which torch's CUDA kernel refuses), the foreach code below runs.
_TORCH_FUSED_DTYPES = {
    ("adam_", "cpu"): (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    ("sgd_", "cpu"): (torch.float32, torch.float64),
}


def dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps or overlaps, in any dim order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _torch_fused_runs(op: str, lists: list[list[Tensor]], uniform: bool) -> bool:
    """Whether torch's fused kernel of ``op`` gives torch.optim's results on these lists (params
    first; ``uniform``: as check_tensor_lists found them): the fastest torch.optim mode, where
    it is correct. It walks each tensor's memory in order, so the tensors of a param must share
    its dense layout (contiguous, usually).
    A compiled step runs the foreach code (dynamo does not trace the fused ops)."""
    params = lists[0]
    dtype = params[0].dtype
    if dtype not in _TORCH_FUSED_DTYPES.get((op, params[0].device.type), ()) or _is_compiling():
        return False
    if uniform:
        return True
    return all(
        dense(p) and all(ts[i].dtype == dtype and ts[i].stride() == p.stride()
                         for ts in lists[1:] if ts)
        for i, p in enumerate(params)
    )  # fmt: skip


def _skip_step(found_inf: Tensor | None) -> bool:
    # A host sync, but only when a GradScaler passes found_inf to the fallback kernels.
    return found_inf is not None and bool(found_inf.item())


def _as_float(value: float | Tensor) -> float:
    return value.item() if isinstance(value, Tensor) else float(value)


def _compute_copies(tensors: list[Tensor]) -> list[Tensor]:
    """fp32 working copies of low-precision tensors; the tensors themselves otherwise."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


def _blocks(lists: list[list[Tensor]]) -> Iterator[tuple[list[int], list[list[Tensor]]]]:
    """``lists`` (params first, the others empty or as long) in blocks: (the param index of each
    entry, the lists of the block). On the CPU about _BLOCK_ELEMENTS elements a block, a
    contiguous tensor longer than that cut into parts (views of the same memory); elsewhere
    one block, since each op there is a kernel launch. Runs of small params are sliced from
    the lists, without Python code per tensor beyond reading its size."""
    params = lists[0]
    if not params or params[0].device.type != "cpu":
        yield list(range(len(params))), lists
        return
    start = size = 0
    for i, numel in enumerate(map(Tensor.numel, params)):
        if numel > _BLOCK_ELEMENTS:
            tensors = [ts[i] if ts else None for ts in lists]
            if all(t is None or t.is_contiguous() for t in tensors):
                if start < i:
                    yield list(range(start, i)), [ts[start:i] for ts in lists]
                start, size = i + 1, 0
                flat = [None if t is None else t.view(-1) for t in tensors]
                for first in range(0, numel, _BLOCK_ELEMENTS):
                    last = first + _BLOCK_ELEMENTS
                    yield [i], [[] if t is None else [t[first:last]] for t in flat]
                continue
        size += numel
        if size >= _BLOCK_ELEMENTS:
            yield list(range(start, i + 1)), [ts[start : i + 1] for ts in lists]
            start, size = i + 1, 0
    if start < len(params):
        yield list(range(start, len(params))), [ts[start:] for ts in lists]


def _store(targets: list[Tensor], values: list[Tensor]) -> None:
    for target, value in zip(targets, values, strict=True):
        if value is not target:
            target.copy_(value)  # rounds to nearest even


def _effective_grads(
    grads: list[Tensor], grad_scale: Tensor | None, maximize: bool
) -> list[Tensor]:
    """Unscaled, sign-corrected gradients in compute precision, to be read only: the grads
    themselves when nothing changes them (fp32, no scale, no maximize), so the kernels below
    update ``g`` out of place. A copy of every grad at every step would move 8 more bytes per
    element and allocate a grad-sized buffer."""
    work = _compute_copies(grads)
    if grad_scale is not None:
        work = torch._foreach_div(work, grad_scale)
    if maximize:
        work = torch._foreach_neg(work)
    return work


# In-place updates outside autograd, as the compiled kernels make them: leaf params that require
# grad may be stepped with grad mode on (through fused_opt.functional, say).
@torch.no_grad()
def sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    weight_decay: float,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    lists = [params, grads, momentum_buffers]
    uniform = check_tensor_lists("sgd_", params, grads=grads, momentum_buffers=momentum_buffers)
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise RuntimeError("fused_opt.sgd_: momentum != 0 needs one momentum buffer per param")
    lr = _as_float(lr)
    weight_decay, momentum, dampening = float(weight_decay), float(momentum), float(dampening)
    if not params or _skip_step(found_inf):
        return
    hyper = dict(weight_decay=weight_decay, momentum=momentum, lr=lr, dampening=dampening,
                 nesterov=nesterov, maximize=maximize, is_first_step=is_first_step)  # fmt: skip
    # torch's kernel unscales the grads in place: with a grad_scale the foreach code runs.
    if grad_scale is None and _torch_fused_runs("sgd_", lists, uniform):
        torch._fused_sgd_(*lists, **hyper)
        return
    on_cpu = params[0].device.type == "cpu" and not _is_compiling()
    if on_cpu and uniform and grad_scale is None:
        _sgd_in_fp32(lists, hyper)
        return
    # On the CPU each list of a block is one vector in compute precision: a few ops a block
    # instead of a dozen per tensor (2000 bf16 params of 4096: 3x faster).
    flat = on_cpu and len(set(map(_dtype_of, params))) == 1
    for _, block in _blocks(lists):
        _sgd_block(*block, grad_scale=grad_scale, flat=flat, **hyper)


def _sgd_in_fp32(lists: list[list[Tensor]], hyper: dict[str, Any]) -> None:
    """Contiguous CPU tensors of one low-precision dtype, block by block through torch's fused
    fp32 kernel on fp32 copies: one pass where the foreach ops make six, rounded once on store
    (GPT-2 small in bf16: 1.3x torch.optim's for-loop; 2000 params of 4096: 1.x its foreach)."""
    scratch = None
    for _, block in _blocks(lists):
        n = sum(map(Tensor.numel, block[0]))
        # torch's kernel rounds its SIMD body and its scalar tail unalike: a length in whole
        # SIMD vectors sends every element through the body, so where a block ends changes
        # no bit. The padding is computed and dropped.
        padded = -(-n // _PAD_ELEMENTS) * _PAD_ELEMENTS
        if scratch is None or scratch.shape[1] < padded:
            # Reused by every block: its pages stay mapped and in the caches.
            # fp32 whatever torch's default dtype (a bf16 default would run torch's bf16 kernel).
            scratch = torch.zeros(len(lists), padded, dtype=torch.float32,
                                  device=block[0][0].device)  # fmt: skip
        spans = [_span(tensors) if tensors else None for tensors in block]
        vectors = [[] if not tensors else [scratch[k, :padded]] for k, tensors in enumerate(block)]
        for k, (tensors, span) in enumerate(zip(block, spans, strict=True)):
            if tensors:
                scratch[k, :n].copy_(span if span is not None else _one_vector(tensors))
        torch._fused_sgd_(*vectors, **hyper)
        for k in (0, 2):  # params and momentum buffers
            if not block[k]:
                continue
            vector = scratch[k, :n]
            if spans[k] is not None:
                spans[k].copy_(vector)
                # The span has a version counter of its own: autograd must see the tensors'
                # change (a param saved for backward and stepped before it is an error).
                torch.autograd.graph.increment_version(block[k])
            else:
                torch._foreach_copy_(block[k], _unflatten(vector, block[k]))


def _span(tensors: list[Tensor]) -> Tensor | None:
    """The tensors as one vector over their memory where they lie end to end in one storage, in
    order (a state made by state_like, a part of one large tensor), else None."""
    if len(tensors) == 1:
        return tensors[0].view(-1)
    first = tensors[0]
    size, base = first.element_size(), first.data_ptr()
    ends = list(itertools.accumulate(map(Tensor.numel, tensors), initial=0))
    if list(map(Tensor.data_ptr, tensors)) != [base + end * size for end in ends[:-1]]:
        return None
    n = ends[-1]
    storage = first.untyped_storage()
    if (first.storage_offset() + n) * size > storage.nbytes():
        return None  # adjacent memory of another allocation: never touched through this one
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        storage, first.storage_offset(), (n,)
    )


def _one_vector(tensors: list[Tensor]) -> Tensor:
    """The tensors' elements, each in its own order, as one vector: a view of a lone contiguous
    tensor, else a copy made in C++ (no Python view per tensor)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    if set(map(Tensor.dim, tensors)) == {1}:
        return torch.cat(tensors)
    return _flatten(tensors)


def _load(tensors: list[Tensor], flat: bool) -> list[Tensor]:
    """The tensors in compute precision (see _compute_copies); ``flat``: as one vector, a view
    of the tensor itself where one contiguous tensor in compute precision is given."""
    if not flat:
        return _compute_copies(tensors)
    vector = _one_vector(tensors)
    return [vector.float() if vector.dtype in _LOW_PRECISION else vector]


def _save(targets: list[Tensor], values: list[Tensor], flat: bool) -> None:
    if not flat:
        _store(targets, values)
        return
    (vector,) = values
    if len(targets) == 1 and vector.data_ptr() == targets[0].data_ptr():
        return  # updated in place
    torch._foreach_copy_(targets, _unflatten(vector.to(targets[0].dtype), targets))


def _sgd_block(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
               weight_decay: float, momentum: float, lr: float, dampening: float, nesterov: bool,
               maximize: bool, is_first_step: bool, grad_scale: Tensor | None,
               flat: bool) -> None:  # fmt: skip
    p = _load(params, flat)
    g = _effective_grads(_load(grads, flat), grad_scale, maximize)
    if weight_decay != 0:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    if momentum != 0:
        buf = _load(momentum_buffers, flat)
        if is_first_step:
            torch._foreach_copy_(buf, g)
        else:
            torch._foreach_mul_(buf, momentum)
            torch._foreach_add_(buf, g, alpha=1 - dampening)
        _save(momentum_buffers, buf, flat)
        if nesterov:
            g = torch._foreach_add(g, buf, alpha=momentum)
        else:
            g = buf
    torch._foreach_add_(p, g, alpha=-lr)
    _save(params, p, flat)


@torch.no_grad()
def adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    uniform = check_tensor_lists(
        "adam_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        steps=steps,
    )
    n = len(params)
    if len(exp_avgs) != n or len(exp_avg_sqs) != n or len(steps) != n:
        raise RuntimeError("fused_opt.adam_: every param needs exp_avg, exp_avg_sq and step")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise RuntimeError("fused_opt.adam_: amsgrad needs one max_exp_avg_sq per param")
    # Every argument read before the first write: torch.optim fails after counting the step.
    lr = _as_float(lr)
    beta1, beta2, weight_decay, eps = float(beta1), float(beta2), float(weight_decay), float(eps)
    if not params or _skip_step(found_inf):
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    # torch's kernel unscales the grads in place: with a grad_scale the foreach code runs.
    torch_fused = (
        grad_scale is None
        and _torch_fused_runs("adam_", lists, uniform)
        and all(dtype.is_floating_point for dtype in set(map(_dtype_of, steps)))
    )
    torch._foreach_add_(steps, 1)
    if torch_fused:
        fused = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
        fused(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1,
            beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
        )  # fmt: skip
        return
    step_counts = [s.item() for s in steps]
    for index, (ps, gs, ms, vs, vmaxs) in _blocks(lists):
        counts = [step_counts[i] for i in index]
        _adam_block(ps, gs, ms, vs, vmaxs, counts, lr, beta1, beta2, weight_decay, eps,
                    amsgrad, maximize, decoupled_weight_decay, grad_scale)  # fmt: skip


def _adam_block(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], step_counts: list[float],
                lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
                grad_scale: Tensor | None) -> None:  # fmt: skip
    p = _compute_copies(params)
    g = _effective_grads(grads, grad_scale, maximize)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, p, alpha=weight_decay)
    m = _compute_copies(exp_avgs)
    v = _compute_copies(exp_avg_sqs)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    _store(exp_avgs, m)
    _store(exp_avg_sqs, v)
    if amsgrad:
        vmax = _compute_copies(max_exp_avg_sqs)
        torch._foreach_maximum_(vmax, v)
        _store(max_exp_avg_sqs, vmax)
        v = vmax
    bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in step_counts]
    neg_step_size = [-lr / (1 - beta1**s) for s in step_counts]
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p, m, denom, neg_step_size)
    _store(params, p)
