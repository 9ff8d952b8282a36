"""What SGD, Adam and AdamW share: the backend choice, the cached plan, and the step loop.

Each class subclasses its torch.optim twin, so constructor checks, param groups, hooks,
``state_dict`` / ``load_state_dict`` and ``zero_grad`` are torch's own, and ``isinstance(opt,
torch.optim.AdamW)`` holds. Only ``step`` is ours: per param group, a cached *plan* holds the
tensors bucketed by (device, dtype) with their state lists, so a step costs one Python pass to
collect the grads and one op call per bucket.
"""

from __future__ import annotations

import collections
import functools
import itertools
import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import (
    _device_dtype_check_for_fused,
    _global_optimizer_post_hooks,
    _global_optimizer_pre_hooks,
)

from .. import _backends, _ops, _torch_kernels
from ..functional import (
    _is_compiling,
    _observed,
    grads_of,
    hyper_names,
    kernel,
    list_names,
    lr_for,
    on_device,
)
from . import _state

try:  # FSDP2 shards params as DTensors; the kernels work on the local shards.
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def kernel_view(t: Tensor) -> Tensor:
    """The tensor a kernel updates in place for ``t``: its local shard, as real numbers."""
    if DTensor is not None and isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _needs_view(t: Tensor) -> bool:
    return t.is_complex() or (DTensor is not None and isinstance(t, DTensor))


# Where each state tensor carved from a shared buffer starts: a whole cache line.
_SLICE_ALIGN_BYTES = 64


def _carve(buffer: Tensor, start: int, shape: torch.Size, stride: tuple[int, ...]) -> Tensor:
    """The part of ``buffer`` at ``start``, as a CPU tensor of its own that shares the memory.

    Views would share their base's version counter: the C++ kernels, which bump the counter of
    every tensor they write on all threads, would then make the cores fight over that one
    cache line (AdamW over 2000 cold small params: 0.05-0.1 ms a step). ``set_`` gives each
    tensor a counter of its own, as torch.optim's state has. Other devices, whose kernels bump
    the counters from one thread, and a compiled step (dynamo does not trace ``set_``) carve
    views.
    """
    if buffer.device.type != "cpu" or _is_compiling():
        return buffer.as_strided(shape, stride, start)
    return buffer.new_empty(0).set_(buffer.untyped_storage(), start, shape, stride)


def state_like(params: list[Tensor]) -> list[Tensor]:
    """A zero state tensor like each param, as ``zeros_like`` makes it, carved from one buffer.

    The kernels stream a step's state in param order; one buffer makes each stream contiguous
    and puts the state of thousands of small params in one allocation instead of thousands
    (on 2000 x 4096 fp32 params, 4% of an Adam step). Each slice starts on a cache line. A
    param that is not a plain contiguous tensor (a DTensor shard, complex, channels_last) gets
    a tensor of its own, laid out by ``zeros_like`` as torch.optim's would be.
    """
    out: list[Tensor | None] = [None] * len(params)
    # (device, dtype) -> [(index, offset)]; params of one optimizer bucket share both.
    slices: dict[tuple, list[tuple[int, int]]] = {}
    ends: dict[tuple, int] = {}
    for i, p in enumerate(params):
        if _needs_view(p) or p.layout != torch.strided or not p.is_contiguous():
            out[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            continue
        key = (p.device, p.dtype)
        align = max(1, _SLICE_ALIGN_BYTES // p.element_size())
        start = -(-ends.get(key, 0) // align) * align
        slices.setdefault(key, []).append((i, start))
        ends[key] = start + p.numel()
    for (device, dtype), places in slices.items():
        buffer = torch.zeros(ends[(device, dtype)], dtype=dtype, device=device)
        for i, start in places:
            p = params[i]
            out[i] = _carve(buffer, start, p.shape, p.stride())
    return out  # type: ignore[return-value]


def zero_scalars(count: int, dtype: torch.dtype, device: torch.device | str) -> list[Tensor]:
    """``count`` zero 0-d tensors (Adam's ``step``), carved from one buffer like ``state_like``:
    the step counts of thousands of params then lie on a few cache lines."""
    buffer = torch.zeros(count, dtype=dtype, device=device)
    return [_carve(buffer, i, torch.Size(), ()) for i in range(count)]


# torch.no_grad() is two Python objects around these C calls; the step's Python code runs out
# of the caches after a backward pass, where those objects cost about 60 us. A compiled step
# keeps torch.no_grad, which dynamo knows.
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled


def same_members(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether lists ``a`` and ``b`` hold the same tensors (by identity) in the same order."""
    direct = _ops.direct_module()
    if direct is not None and type(a) is list and type(b) is list and not _is_compiling():
        return direct.same_items(a, b)
    return len(a) == len(b) and all(map(operator.is_, a, b))


def kernel_takes(p: Tensor) -> bool:
    """Whether the compiled kernels step ``p`` in place: dense memory (any order) of plain
    values. Under backend="auto" other params go to the torch backend; a forced "cpp" or
    "cuda" refuses them."""
    if _is_compiling():  # dynamo does not trace is_neg(); a compiled step has no such views
        return _torch_kernels.dense(p)
    return _torch_kernels.dense(p) and not (p.is_neg() or p.is_conj())


def check_number(value: Any, name: str, tensor_error: type[Exception] = RuntimeError) -> None:
    """Raise the exception torch.optim's for-loop step raises on this hyper-parameter, before
    the step changes anything: TypeError for what is no number, ``tensor_error`` for a tensor
    of several elements (RuntimeError where torch tests its truth or broadcasts it, TypeError
    where it passes it as a Number argument, as it does ``lr``)."""
    if type(value) is float or type(value) is int:
        return
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise tensor_error(
                f"{name} must be a number or a one-element tensor, got a tensor of "
                f"{value.numel()} elements"
            )
    elif not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")


class Call(NamedTuple):
    """One kernel call: the op's overload, the tensor lists and the keyword-only arguments in
    the schema's order, and what to do once it ran (store state the step created)."""

    overload: str
    tensor_lists: tuple
    hyper: tuple
    done: Callable[[], None] | None = None


class Bucket:
    """The params of one group on one device with one dtype, and their state, ready for a kernel."""

    __slots__ = ("device", "backend", "kernels", "directs", "checks", "op", "index", "owners",
                 "params", "state", "viewed", "first_step", "reads_grads")  # fmt: skip

    def __init__(
        self,
        device: torch.device,
        op: str,
        backend: str,
        index: list[int],
        owners: list[Tensor],
        state: list[list[Tensor]],
        first_step: bool,
    ) -> None:
        self.device = device
        self.backend = backend
        self.op = op
        # By overload ("default", "tensor_lr", Adam's "tensor_hyper"): the kernel of each.
        self.kernels = {name: kernel(op, backend, device, name) for name in _ops.OVERLOADS[op]}
        # Their direct entry points (eager cpp kernels), else None: see FusedOptimizer._run.
        self.directs = {name: getattr(k, "direct", None) for name, k in self.kernels.items()}
        # The cpp kernels' checks alone (check_sgd_ / check_adam_), else None: see check().
        direct = self.directs["default"] is not None
        self.checks = getattr(_ops.direct_module(), f"check_{op}") if direct else None
        self.index = index  # positions in group["params"]
        self.owners = owners  # the params themselves (state keys)
        self.viewed = any(_needs_view(p) for p in owners)
        self.params = [kernel_view(p) for p in owners] if self.viewed else owners
        self.state = [[kernel_view(t) for t in ts] for ts in state] if self.viewed else state
        self.first_step = first_step
        # Whether the kernel can read the grads from the params itself (eager cpp kernels, plain
        # Tensor or Parameter params): no Python object is then made for a new grad.
        self.reads_grads = (
            not self.viewed
            and all(getattr(k, "reads_grads", False) for k in self.kernels.values())
            and all(type(p) is torch.nn.Parameter or type(p) is Tensor for p in owners)
        )

    def grads(self, all_grads: list[Tensor], whole_group: bool) -> list[Tensor]:
        grads = all_grads if whole_group else [all_grads[i] for i in self.index]
        return [kernel_view(g) for g in grads] if self.viewed else grads

    def check(self, call: Call) -> bool:
        """Raise RuntimeError, changing nothing, where this bucket's kernel would refuse ``call``;
        False when the grads are to be read by the kernel and cannot be (a param without one)."""
        if self.checks is not None and not _observed():
            return self.checks(*call.tensor_lists, *call.hyper)
        params, *others = call.tensor_lists
        if others[0] is None:
            return False
        named = dict(zip(list_names(self.op), others, strict=True))
        _torch_kernels.check_tensor_lists(self.op, params, **named)
        if self.backend == "cuda" and self.op == "adam_":
            _check_cuda_steps(named["steps"], self.device)
        return True


def _check_cuda_steps(steps: list[Tensor], device: torch.device) -> None:
    """The CUDA Adam kernel's check of the step counts, made before any bucket launches: one
    element of fp32 or fp64 each, all on the CPU or all on the params' device (capturable)."""
    if not steps:
        return
    where = steps[0].device
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(
                f"fused_opt.adam_: steps[{i}] must be a 1-element float32 or float64 tensor, "
                f"got {s.dtype} {tuple(s.shape)}"
            )
        if (
            s.device != where
            or where.type not in ("cpu", device.type)
            or (where.type == "cuda" and where != device)
        ):
            raise RuntimeError(
                f"fused_opt.adam_: steps[{i}] is on {s.device}; steps must all be on the CPU "
                f"or all on {device} (capturable)"
            )


class Plan:
    """A group's buckets, valid while its params list holds the same params, the set of params
    with grads and the optimizer's state dicts (see _state.py) hold.

    ``by_torch_optim``: the positions of the params that torch.optim's own for-loop step
    updates instead of a kernel (see FusedOptimizer._torch_optim_step). ``stale``: rebuilt at
    the next step (it was made for this step's grads alone, or the step creates state).
    """

    __slots__ = ("params", "members", "missing", "flags", "buckets", "whole_group",
                 "reads_grads", "stale", "by_torch_optim", "generation")  # fmt: skip

    def __init__(self, params: list[Tensor], missing: list[int], flags: tuple,
                 buckets: list[Bucket], by_torch_optim: list[int] | None = None,
                 stale: bool = False) -> None:  # fmt: skip
        self.params = params
        # A copy: `group["params"][i] = new_param` changes the list in place, and the new param
        # must then be trained, as torch.optim's step would.
        self.members = list(params)
        self.missing = missing
        self.flags = flags
        self.buckets = buckets
        self.by_torch_optim = by_torch_optim or []
        # One bucket over every param of the group: the grads list is passed as it is.
        self.whole_group = len(buckets) == 1 and not missing and not self.by_torch_optim
        # ... and its kernel may read the grads itself, which it does while every param has one.
        self.reads_grads = self.whole_group and buckets[0].reads_grads
        self.stale = stale
        self.generation = _state.generation()

    def fits(self, params: list[Tensor], missing: list[int], flags: tuple) -> bool:
        return (not self.stale and self.params is params and same_members(params, self.members)
                and self.missing == missing and self.flags == flags
                and self.generation == _state.generation())  # fmt: skip


class FusedOptimizer:
    """Mixin placed before a torch.optim class: ``class Adam(FusedOptimizer, torch.optim.Adam)``."""

    _op: str  # the fused op this optimizer calls: "sgd_" or "adam_"
    _hyper_names: tuple[str, ...]  # its keyword-only arguments in the schema's order, from _op
    _plans: dict[int, Plan]
    _backend_request: str
    # True while a step runs that found, as it began, that nothing watches its calls (see
    # profile_hook_step): its kernels are then called straight through their direct entry
    # points, without asking again.
    _unobserved = False
    # This step's hyper-parameter tensors moved to other devices, by group, name and device:
    # see functional.lr_for and hyper_for.
    _moved_hyper: dict[int, dict]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_op" in cls.__dict__:
            cls._hyper_names = hyper_names(getattr(torch.ops.fused_opt, cls._op).default)

    def _init_backend(self, backend: str | None) -> None:
        """Called before torch.optim's __init__, which adds the param groups."""
        self._backend_request = _backends.normalize(backend)
        self._plans = {}

    # ---- what each optimizer defines -----------------------------------------------------
    def _plan_flags(self, group: dict[str, Any]) -> tuple:
        """Group settings that change the shape of the state lists."""
        raise NotImplementedError

    def _has_state(self, state: dict[str, Any]) -> bool:
        return len(state) > 0

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """Raise what torch.optim's step raises on the group's hyper-parameters (written into
        ``param_groups`` after construction), before anything changes."""
        raise NotImplementedError

    def _state_lists(
        self, group: dict[str, Any], owners: list[Tensor], backend: str
    ) -> tuple[list[list[Tensor]], bool]:
        """The kernel's state lists for ``owners`` (stepped by ``backend``), and whether this
        step creates their state."""
        raise NotImplementedError

    def _call(self, group: dict[str, Any], bucket: Bucket, grads: list[Tensor] | None,
              grad_scale: Tensor | None, found_inf: Tensor | None) -> Call | None:  # fmt: skip
        """The bucket's kernel call (None: this step is skipped); grads=None (when
        bucket.reads_grads): the kernel reads them from the params."""
        raise NotImplementedError

    def _by_torch_optim(self, p: Tensor, grad: Tensor) -> bool:
        """Whether torch.optim's for-loop step must update ``p`` (with ``grad``) at this step:
        what it accepts and the kernels do not (SGD's sparse grads, a grad of another dtype)."""
        return False

    def _state_by_torch_optim(self, state: dict[str, Any]) -> bool:
        """Whether a param's state is one only torch.optim's for-loop step takes: a sparse
        tensor (SGD's momentum after sparse grads), an int64 ``step`` loaded from a checkpoint."""
        return any(isinstance(t, Tensor) and t.layout != torch.strided for t in state.values())

    def _bucket_lr(self, group: dict[str, Any], bucket: Bucket) -> float | Tensor:
        """The group's lr as the bucket's kernel reads it (see functional.lr_for)."""
        return lr_for(bucket.device, group["lr"], self._moved(group))

    def _moved(self, group: dict[str, Any]) -> dict:
        """This step's copies of the group's hyper-parameter tensors on other devices."""
        return self._moved_hyper.setdefault(id(group), {})

    def _run(self, bucket: Bucket, call: Call) -> Any:
        """Runs ``call`` on the bucket's kernel.

        In a step that nothing watches, a cpp kernel is called through its direct entry point
        with the hyper-parameters as they are, without asking again and without keywords:
        13-21 us less a step with the caches cold, as after a backward pass (of 65-135 for one
        small param), 1 us less warm (of 4.5).
        """
        direct = bucket.directs[call.overload]
        if direct is not None and self._unobserved:
            done = direct(*call.tensor_lists, *call.hyper)
        else:
            keywords = dict(zip(self._hyper_names, call.hyper, strict=True))
            done = bucket.kernels[call.overload](*call.tensor_lists, **keywords)
        if call.done is not None and done is not False:
            call.done()
        return done

    def _launch(self, group: dict[str, Any], bucket: Bucket, grads: list[Tensor] | None,
                grad_scale: Tensor | None, found_inf: Tensor | None) -> bool | None:  # fmt: skip
        call = self._call(group, bucket, grads, grad_scale, found_inf)
        return None if call is None else self._run(bucket, call)

    # SGD trains with sparse grads (nn.Embedding(sparse=True)) through torch.optim's own step.
    _supports_sparse = False

    def _check_dense(self, grads: list[Tensor | None]) -> None:
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients"
                    + (", please consider SparseAdam instead" if self._op == "adam_" else "")
                )

    def _twin_step(self) -> Callable[..., Any]:
        """torch.optim's own ``step`` of the class this one stands in for, without the hooks:
        torch wraps it with them once one of its instances exists, and ours run already."""
        twin = next(c for c in type(self).__mro__
                    if c.__module__.startswith("torch.optim") and "step" in c.__dict__)  # fmt: skip
        step = twin.__dict__["step"]
        while getattr(step, "hooked", False):
            step = step.__wrapped__
        return step

    def _torch_optim_step(self, group: dict[str, Any], index: list[int]) -> None:
        """torch.optim's for-loop step (its default on the CPU) over the group's params at
        ``index``, in order: for what the kernels do not take, as torch.optim takes it."""
        params = group["params"]
        sub = dict(group, params=[params[i] for i in index], foreach=False, fused=False)
        if "capturable" in sub and all(params[i].device.type == "cpu" for i in index):
            sub["capturable"] = False  # torch's capturable path refuses CPU tensors
        groups = self.param_groups  # type: ignore[attr-defined]
        self.param_groups = [sub]
        try:
            self._twin_step()(self)
        finally:
            self.param_groups = groups

    # ---- torch.optim.Optimizer overrides --------------------------------------------------
    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch.optim's wrapper of ``step``, without its profiler range when nothing records it.

        torch.optim runs every step inside ``record_function("Optimizer.step#<class>.step")``
        with the step hooks inside. Opening that range costs a few microseconds, and about
        0.2 ms when a backward pass has left its code and data out of the caches, even with no
        profiler running. When nothing could record or trace it (no profiler, no RecordFunction
        callback, no tracing, no mode) the hooks run the same way without the range; otherwise
        torch's wrapper runs as it is.
        """
        with_range = torch.optim.Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def step(*args: Any, **kwargs: Any) -> Any:
            if _ops.direct_module() is None or _observed():
                return with_range(*args, **kwargs)
            self = args[0]
            # A pre-hook might start something that watches: the kernels then ask themselves.
            hooked = bool(_global_optimizer_pre_hooks or self._optimizer_step_pre_hooks)
            pre_hooks = itertools.chain(
                _global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
            )
            for hook in pre_hooks:
                result = hook(self, args, kwargs)
                if result is None:
                    continue
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"{func} must return None or a tuple of (new_args, new_kwargs), "
                        f"but got {result}."
                    )
                args, kwargs = result
            self._unobserved = not hooked
            try:
                out = func(*args, **kwargs)
            finally:
                self._unobserved = False
            self._optimizer_step_code()  # where torch's profiler finds the step boundary
            post_hooks = itertools.chain(
                self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()
            )
            for hook in post_hooks:
                hook(self, args, kwargs)
            return out

        return step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        try:
            for p in self.param_groups[-1]["params"]:  # type: ignore[attr-defined]
                _backends.resolve(self._backend_request, p.device)
        except ValueError:
            self.param_groups.pop()  # type: ignore[attr-defined]
            raise

    @property
    def state(self) -> _state.OptimizerState:
        """torch.optim's ``state`` (param -> dict), watched for changes by the cached plans.

        Assigning a mapping (``optimizer.state = defaultdict(dict)``) stores a watched copy.
        """
        return self.__dict__["state"]

    @state.setter
    def state(self, value: Any) -> None:
        if type(value) is not _state.OptimizerState:
            value = _state.OptimizerState(value)
        self.__dict__["state"] = value
        _state.changed()

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()  # type: ignore[misc]
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
            state_dict["state"] = _state.plain_state(state_dict["state"])
        return state_dict

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_backend_request"] = self._backend_request
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also reached from load_state_dict: every cached plan refers to replaced state.
        super().__setstate__(state)  # type: ignore[misc]
        self.state = self.__dict__["state"]  # torch.optim's __setstate__ stores a plain dict
        self.__dict__.setdefault("_backend_request", _backends.normalize(None))
        self._plans = {}

    @property
    def backend(self) -> str | dict[str, str]:
        """The backend that runs: one name, or ``{device: name}`` if params live on several."""
        if any(group["differentiable"] for group in self.param_groups):  # type: ignore[attr-defined]
            return "torch.optim (differentiable=True)"
        per_device = {}
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if str(p.device) not in per_device:
                    per_device[str(p.device)] = _backends.resolve(self._backend_request, p.device)
        return next(iter(per_device.values())) if len(per_device) == 1 else per_device

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        for group in self.param_groups:  # type: ignore[attr-defined]
            if group["differentiable"]:
                # Gradients through the update itself: torch.optim's own implementation runs
                # (its hooks have run: they wrap this step).
                return self._twin_step()(self, closure)
        loss = None
        if closure is not None:
            self._unobserved = False  # the closure might start something that watches
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler for optimizers with _step_supports_amp_scaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if _is_compiling():
            with torch.no_grad():
                self._step_groups(grad_scale, found_inf)
        else:
            enabled = _grad_enabled()
            _set_grad_enabled(False)
            try:
                self._step_groups(grad_scale, found_inf)
            finally:
                _set_grad_enabled(enabled)
        return loss

    def _step_groups(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The step of every param group, grad mode off.

        Every check comes before the first write: the hyper-parameters of all groups, then
        the tensors of every bucket. One bucket in all is checked by its kernel, which checks
        everything before it writes; several are checked first, each by its kernel's checks.
        When a check fails, the careful path looks at each grad (sparse grads, grads of another
        dtype go to torch.optim's own step) and checks again: a real error then raises.
        """
        groups = self.param_groups  # type: ignore[attr-defined]
        for group in groups:
            self._check_hyper(group)
        moved: tuple[dict, dict] = ({}, {})
        self._moved_hyper = {}
        careful = False
        if len(groups) == 1:
            group = groups[0]
            plan = self._plans.get(id(group))
            if (plan is not None and plan.reads_grads
                    and plan.fits(group["params"], [], self._plan_flags(group))):  # fmt: skip
                bucket = plan.buckets[0]
                scale, inf = (on_device(grad_scale, bucket.device, moved[0]),
                              on_device(found_inf, bucket.device, moved[1]))  # fmt: skip
                try:
                    if self._launch(group, bucket, None, scale, inf):
                        return  # every param had a grad, and the kernel read them
                except RuntimeError:
                    careful = True  # refused before it changed anything: see below
        while True:
            work = [self._prepare(group, careful) for group in groups]
            calls = [[self._call(group, bucket, bucket.grads(grads, plan.whole_group),
                                 on_device(grad_scale, bucket.device, moved[0]),
                                 on_device(found_inf, bucket.device, moved[1]))
                      for bucket in plan.buckets] for group, plan, grads in work]  # fmt: skip
            # One kernel call in all checks its tensors itself before it writes.
            one_kernel = all(not plan.by_torch_optim for _, plan, _ in work) and (
                sum(len(plan.buckets) for _, plan, _ in work) == 1
            )
            if not _is_compiling() and (careful or not one_kernel):
                try:
                    for (_, plan, _), group_calls in zip(work, calls, strict=True):
                        for bucket, call in zip(plan.buckets, group_calls, strict=True):
                            if call is not None:
                                bucket.check(call)
                except RuntimeError:
                    if careful:
                        raise
                    careful = True
                    continue
            try:
                self._run_all(work, calls)
            except RuntimeError:
                if careful or not one_kernel:
                    raise
                careful = True  # the kernel refused before it changed anything
                continue
            return

    def _run_all(self, work: list[tuple[dict, Plan, list]], calls: list[list[Call | None]]) -> None:
        for (group, plan, _), group_calls in zip(work, calls, strict=True):
            if plan.by_torch_optim:
                self._torch_optim_step(group, plan.by_torch_optim)
            for bucket, call in zip(plan.buckets, group_calls, strict=True):
                if call is not None:
                    self._run(bucket, call)
                if bucket.first_step:
                    plan.stale = True  # the state it created changes the buckets

    def _prepare(self, group: dict[str, Any], careful: bool) -> tuple[dict, Plan, list]:
        """The group, its plan for this step and its grads."""
        params = group["params"]
        grads, missing = grads_of(params)
        flags = self._plan_flags(group)
        plan = self._plans.get(id(group))
        if careful or plan is None or not plan.fits(params, missing, flags):
            plan = self._plans[id(group)] = self._build_plan(group, grads, missing, flags, careful)
        return group, plan, grads

    # ---- the plan ---------------------------------------------------------------------------
    def _lay_out_state_like_params(self, owners: list[Tensor]) -> None:
        """Re-lays out, once, state that does not share its param's strides.

        State loaded from a checkpoint keeps the layout it was saved in: a model moved to
        channels_last after the checkpoint was written has channels_last params and contiguous
        state. The kernels would update such a tensor through a copy at every step.
        """
        for p in owners:
            if _needs_view(p):
                continue
            state = self.state.get(p, {})  # type: ignore[attr-defined]
            for key, t in state.items():
                if (isinstance(t, Tensor) and t.layout == torch.strided and t.shape == p.shape
                        and t.stride() != p.stride()
                        and not (t.is_contiguous() and p.is_contiguous())):  # fmt: skip
                    state[key] = torch.empty_like(
                        p, dtype=t.dtype, device=t.device, memory_format=torch.preserve_format
                    ).copy_(t)

    def _build_plan(self, group: dict[str, Any], grads: list[Tensor | None], missing: list[int],
                    flags: tuple, careful: bool = False) -> Plan:  # fmt: skip
        """The group's buckets; ``careful``: this step's grads are looked at one by one too, and
        the plan serves this step alone."""
        params = group["params"]
        with_grad = [i for i, g in enumerate(grads) if g is not None]
        if careful and any(self._by_torch_optim(params[i], grads[i]) for i in with_grad):  # type: ignore[arg-type]
            # torch.optim's step, for this step: e.g. SGD over an embedding's sparse grads.
            return Plan(params, missing, flags, [], with_grad, stale=True)
        if not self._supports_sparse:
            self._check_dense(grads)  # before any state is created
        if group.get("fused"):
            # torch.optim's fused=True refuses params of other devices (meta, say); so do we,
            # though our kernels run whatever `fused` says.
            for i in with_grad:
                _device_dtype_check_for_fused(params[i])
        # A param listed twice (torch.optim warns, then steps it twice, in order) or with state
        # only torch.optim takes: torch.optim's step.
        counts = collections.Counter(map(id, params))
        by_torch_optim = [
            i for i in with_grad if counts[id(params[i])] > 1
            or self._state_by_torch_optim(self.state.get(params[i], {}))  # type: ignore[attr-defined]
        ]  # fmt: skip
        taken = set(by_torch_optim)
        by_key: dict[tuple, list[int]] = {}
        for i in with_grad:
            if i in taken:
                continue
            p = params[i]
            has_state = self._has_state(self.state.get(p, {}))  # type: ignore[attr-defined]
            backend = _backends.resolve(self._backend_request, p.device)
            if backend in ("cpp", "cuda") and not kernel_takes(p):
                if self._backend_request != "auto":
                    raise RuntimeError(
                        f"fused_opt: backend {backend!r} cannot step params[{i}] of shape "
                        f"{tuple(p.shape)} and strides {p.stride()}: its memory is not dense "
                        "(or it is a lazy neg/conj view); backend='auto' steps it with the "
                        "torch backend"
                    )
                backend = "torch"  # memory the kernels cannot step in place: foreach ops can
            by_key.setdefault((p.device, p.dtype, has_state, backend), []).append(i)
        buckets = []
        for (device, _, _, backend), index in by_key.items():
            owners = [params[i] for i in index]
            self._lay_out_state_like_params(owners)
            state_lists, first_step = self._state_lists(group, owners, backend)
            buckets.append(
                Bucket(device, self._op, backend, index, owners, state_lists, first_step)
            )
        return Plan(params, missing, flags, buckets, by_torch_optim, stale=careful)
