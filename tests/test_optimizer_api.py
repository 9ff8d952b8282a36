"""Everything a normal training loop does with an optimizer works as with torch.optim.

The drop-in promise: same classes (isinstance), same constructor, and the same trajectory through
param groups, add_param_group, frozen params, closures, zero_grad, lr as a Tensor, every lr
scheduler, complex params, clip_grad_norm_, channels-last params and a real nn.Module loop.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _reference import (
    FUSED_CLASSES,
    TIGHT,
    TORCH_CLASSES,
    FusedOpCounter,
    assert_same_state,
    clone_params,
    grad_stream,
    make_params,
    set_grads,
    train,
)
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.optim.swa_utils import SWALR

import fused_opt

pytestmark = pytest.mark.usefixtures("single_threaded")

NAMES = ["SGD", "Adam", "AdamW"]
SMALL_SHAPES = [(), (5,), (17,), (3, 4)]
FP32 = TIGHT[torch.float32]
# A configuration of each optimizer that exercises its whole state.
FULL_STATE = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": dict(lr=0.05, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=0.05, amsgrad=True),
}


def _twins(name: str, make_groups: Callable[[list], Any], backend: str, device: torch.device,
           shapes=SMALL_SHAPES, dtype=torch.float32, **kwargs: Any) -> tuple:  # fmt: skip
    """fused_opt and torch.optim (for-loop) optimizers over copies of the same params.

    ``make_groups(params)`` turns a param list into the first argument of the constructor.
    """
    params = make_params(shapes, dtype=dtype, device=device)
    ours_params, ref_params = clone_params(params), clone_params(params)
    ours = FUSED_CLASSES[name](make_groups(ours_params), backend=backend, **kwargs)
    ref = TORCH_CLASSES[name](make_groups(ref_params), foreach=False, **kwargs)
    return ours, ours_params, ref, ref_params


def _plain(params: list) -> list:
    return params


# ---- the class and its constructor -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_is_an_instance_of_the_torch_optim_class(name):
    opt = FUSED_CLASSES[name](make_params(), backend="torch")
    assert isinstance(opt, TORCH_CLASSES[name])
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_is_torch_optims_plus_backend(name):
    ours = inspect.signature(FUSED_CLASSES[name]).parameters
    theirs = inspect.signature(TORCH_CLASSES[name]).parameters
    assert list(ours) == [*theirs, "backend"]
    for arg, param in theirs.items():
        assert (ours[arg].kind, ours[arg].default) == (param.kind, param.default), arg
    assert ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["backend"].default is None  # None: $FUSED_OPT_BACKEND, else "auto"


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_param_groups_are_torch_optims(name):
    ours = FUSED_CLASSES[name](make_params(), backend="torch")
    ref = TORCH_CLASSES[name](make_params())
    assert ours.defaults == ref.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in ref.param_groups
    ]


def test_backend_reports_what_runs(backend, device):
    params = make_params(device=device)
    assert fused_opt.SGD(params, backend=backend).backend == backend
    auto = fused_opt.Adam(params).backend
    compiled = {"cpu": "cpp", "cuda": "cuda"}[device.type]
    assert auto == (compiled if compiled in fused_opt.available_backends() else "torch")
    assert fused_opt.AdamW(params, differentiable=True).backend.startswith("torch.optim")


def test_backend_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("FUSED_OPT_BACKEND", "torch")
    assert fused_opt.SGD(make_params()).backend == "torch"
    monkeypatch.setenv("FUSED_OPT_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        fused_opt.SGD(make_params())
    assert fused_opt.SGD(make_params(), backend="torch").backend == "torch"


# ---- hyper-parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tensor_hyperparameters_match_torch(name, backend, device):
    """lr as a Tensor (and the other hyper-parameters torch accepts as Tensors)."""
    kwargs = {**FULL_STATE[name], "lr": torch.tensor(0.05)}
    if name == "SGD":
        kwargs["weight_decay"] = torch.tensor(0.01)
    else:
        kwargs["betas"] = (torch.tensor(0.8), torch.tensor(0.99))
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **kwargs)

    def lower_lr(step: int) -> None:  # updated in place, as a scheduler of a Tensor lr does
        if step == 4:
            ours.param_groups[0]["lr"].fill_(0.01)
            ref.param_groups[0]["lr"].fill_(0.01)

    train([(ours, ours_params), (ref, ref_params)], 10, after_step=lower_lr)
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


def _three_groups(name: str) -> Callable[[list], list[dict]]:
    """Groups with different hyper-parameters, including ones that change the state kept."""
    per_group = {
        "SGD": [
            dict(),
            dict(lr=0.1, momentum=0.0),
            dict(momentum=0.5, dampening=0.2, nesterov=False, weight_decay=0.1, maximize=True),
        ],  # fmt: skip
        "Adam": [
            dict(),
            dict(lr=0.01, betas=(0.8, 0.9), amsgrad=False),
            dict(eps=1e-3, weight_decay=0.1, maximize=True),
        ],  # fmt: skip
        "AdamW": [
            dict(),
            dict(lr=0.2, betas=(0.5, 0.99), amsgrad=False, weight_decay=0.0),
            dict(eps=1e-6, weight_decay=0.5),
        ],  # fmt: skip
    }[name]
    return lambda params: [
        {"params": params[i::3], **options} for i, options in enumerate(per_group)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(
        name, _three_groups(name), backend, device, shapes=[(3,), (5,), (7,), (), (11,), (2, 3)],
        **FULL_STATE[name],
    )  # fmt: skip
    train([(ours, ours_params), (ref, ref_params)], 12)
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_changed_between_steps_are_used(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, lr=0.05)
    changes = {
        "SGD": {
            2: dict(momentum=0.9),
            5: dict(nesterov=True, weight_decay=0.1),
            8: dict(momentum=0.0),
        },
        "Adam": {
            2: dict(betas=(0.5, 0.9)),
            5: dict(weight_decay=0.1, eps=1e-2),
            8: dict(maximize=True),
        },
        "AdamW": {2: dict(betas=(0.5, 0.9)), 5: dict(weight_decay=0.3), 8: dict(lr=0.5)},
    }[name]

    def change(step: int) -> None:
        for opt in (ours, ref):
            opt.param_groups[0].update(changes.get(step, {}))

    train([(ours, ours_params), (ref, ref_params)], 11, after_step=change)
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


# ---- which params step ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_mid_training(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    train([(ours, ours_params), (ref, ref_params)], 4)
    later = make_params([(6,), (2, 2)], device=device, seed=7)
    ours_later, ref_later = clone_params(later), clone_params(later)
    ours.add_param_group({"params": ours_later, "lr": 0.02})
    ref.add_param_group({"params": ref_later, "lr": 0.02})
    train([(ours, ours_params + ours_later), (ref, ref_params + ref_later)], 5)
    assert_same_state(ours, ours_params + ours_later, ref, ref_params + ref_later, **FP32)
    if name != "SGD":  # per-tensor step counts: the new params have taken fewer steps
        assert ours.state[ours_params[0]]["step"].item() == 9
        assert ours.state[ours_later[0]]["step"].item() == 5


@pytest.mark.parametrize("name", NAMES)
def test_frozen_params_are_skipped_without_state_until_unfrozen(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    frozen = [1, 3]  # e.g. the pre-trained layers of a model being fine-tuned
    initial = [ours_params[i].detach().clone() for i in frozen]
    grads = grad_stream(ours_params)
    for step in range(10):
        step_grads = next(grads)
        if step < 5:
            for i in frozen:
                step_grads[i] = None
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, step_grads)
            opt.step()
        if step == 4:
            for i, value in zip(frozen, initial, strict=True):
                assert torch.equal(ours_params[i].detach(), value), "a frozen param moved"
                assert not ours.state.get(ours_params[i]), "state was created for a frozen param"
    for i, value in zip(frozen, initial, strict=True):
        assert not torch.equal(ours_params[i].detach(), value), "an unfrozen param did not move"
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_in_some_steps(name, backend, device):
    """Branches of a model not used in a step: their params keep their state and do not move."""
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    grads = grad_stream(ours_params)
    for step in range(12):
        step_grads = [None if (i + step) % 3 == 0 else g for i, g in enumerate(next(grads))]
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, step_grads)
            opt.step()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


# ---- the loop around step() ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    target = [torch.randn_like(p) for p in ours_params]

    def closure_for(opt, params, calls):
        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True))
            loss.backward()
            return loss

        return closure

    ours_calls, ref_calls = [], []
    for _ in range(5):
        with torch.no_grad():  # step() must re-enable grad for the closure
            ours_loss = ours.step(closure_for(ours, ours_params, ours_calls))
            ref_loss = ref.step(closure_for(ref, ref_params, ref_calls))
        torch.testing.assert_close(ours_loss, ref_loss, **FP32)
    assert ours_calls == [True] * 5
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


# ---- step hooks and the profiler ----------------------------------------------------------------
# fused_opt replaces torch.optim's step wrapper by one that skips the profiler range when nothing
# records it (optim/_base.py, profile_hook_step); hooks must behave the same with and without.
@pytest.mark.parametrize("profiled", [False, True], ids=["unprofiled", "profiled"])
@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_run_as_in_torch_optim(name, profiled, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    events: dict[Any, list] = {ours: [], ref: []}
    handles = [
        register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: events[opt].append(("global pre", len(args), kwargs))
        ),
        register_optimizer_step_post_hook(
            lambda opt, args, kwargs: events[opt].append(("global post", len(args), kwargs))
        ),
    ]

    def swap_closure(opt, args, kwargs):  # a pre-hook may replace the step's arguments
        events[opt].append(("pre", len(args), kwargs))
        return (opt,), {"closure": lambda: torch.tensor(7.0)}

    try:
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            opt.register_step_pre_hook(swap_closure)
            opt.register_step_post_hook(lambda o, a, k: events[o].append(("post", len(a), k)))
            set_grads(params, next(grad_stream(params)))
            with torch.profiler.profile() if profiled else contextlib.nullcontext():
                loss = opt.step()
            assert loss.item() == 7.0
    finally:
        for handle in handles:
            handle.remove()
    assert [(e[0], e[1], list(e[2])) for e in events[ours]] == [
        ("global pre", 1, []), ("pre", 1, []), ("post", 1, ["closure"]),
        ("global post", 1, ["closure"]),
    ]  # fmt: skip
    assert [(e[0], e[1], list(e[2])) for e in events[ref]] == [
        (e[0], e[1], list(e[2])) for e in events[ours]
    ]
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("profiled", [False, True], ids=["unprofiled", "profiled"])
def test_a_pre_hook_returning_something_else_raises_like_torch_optim(profiled, backend, device):
    ours, ours_params, ref, ref_params = _twins("AdamW", _plain, backend, device)
    messages = []
    for opt, params in ((ours, ours_params), (ref, ref_params)):
        opt.register_step_pre_hook(lambda *_: 5)
        set_grads(params, next(grad_stream(params)))
        with torch.profiler.profile() if profiled else contextlib.nullcontext():
            with pytest.raises(RuntimeError) as error:
                opt.step()
        messages.append(str(error.value).split(" must ")[1])
    expected = "return None or a tuple of (new_args, new_kwargs), but got 5."
    assert messages[0] == messages[1] == expected
    assert_same_state(ours, ours_params, ref, ref_params, rtol=0, atol=0)  # no step taken


@pytest.mark.parametrize("name", NAMES)
def test_the_profiler_sees_the_step_and_its_boundary(name, backend, device, monkeypatch):
    ours, ours_params, _, _ = _twins(name, _plain, backend, device)
    boundaries = []
    monkeypatch.setattr(ours, "_optimizer_step_code", lambda: boundaries.append(1))
    set_grads(ours_params, next(grad_stream(ours_params)))
    ours.step()
    with torch.profiler.profile() as profiler:
        ours.step()
    assert f"Optimizer.step#{name}.step" in {event.name for event in profiler.events()}
    assert len(boundaries) == 2  # torch's profiler finds step boundaries through this method


def test_the_cpp_step_knows_when_something_may_watch_it():
    """The direct entry points skip the dispatcher; whenever a mode, the profiler or a
    RecordFunction callback could watch, the step must call the op instead (_C_direct.observed)."""
    native = fused_opt._ops.direct_module()
    if native is None:
        pytest.skip(f"no accelerator: {fused_opt._ops.DIRECT_NOTE}")
    from torch.utils._python_dispatch import TorchDispatchMode

    class FunctionMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DispatchMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not native.observed()
    watchers = [FunctionMode, DispatchMode, torch.profiler.profile, torch.autograd.profiler.profile]
    for watcher in watchers:
        with watcher():
            assert native.observed(), watcher
        assert not native.observed(), watcher


@pytest.mark.parametrize("name", NAMES)
def test_a_dispatch_mode_sees_the_fused_op(name, backend, device):
    if backend == "torch":
        pytest.skip("the torch backend runs its PyTorch kernels without a fused op")
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device)
    grads = grad_stream(ours_params)
    counter = FusedOpCounter()
    for watched in (False, False, True):  # the last one with a plan that reads its own grads
        g = next(grads)
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, g)
            with counter if watched and opt is ours else contextlib.nullcontext():
                opt.step()
    assert counter.calls == 1
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("start", ["pre-hook", "closure"])
@pytest.mark.parametrize("name", NAMES)
def test_a_mode_started_inside_the_step_sees_the_fused_op(name, start, backend, device):
    """A step asks once, as it begins, whether anything watches its calls; a pre-hook or the
    closure may start something that does, and the op must then go through the dispatcher."""
    if backend == "torch":
        pytest.skip("the torch backend runs its PyTorch kernels without a fused op")
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device)
    grads = grad_stream(ours_params)
    for _ in range(2):  # the plan is steady after these
        g = next(grads)
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, g)
            opt.step()
    mode = FusedOpCounter()

    def closure():
        mode.__enter__()
        return torch.tensor(0.0)

    g = next(grads)
    set_grads(ours_params, g)
    set_grads(ref_params, g)
    handle = ours.register_step_pre_hook(lambda *_: mode.__enter__() and None)
    if start == "closure":
        handle.remove()
    try:
        ours.step(closure if start == "closure" else None)
    finally:
        mode.__exit__(None, None, None)
        handle.remove()
    ref.step()
    assert mode.calls == 1
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_steady_steps_let_the_kernel_read_the_grads(name, backend, device, monkeypatch):
    """Once its plan is steady, a cpp step reads the grads in C++ (no Python object per new
    grad); a param that loses its grad, or a mode watching, sends it back to the Python path."""
    import fused_opt.optim._base as base

    read_in_python = []
    grads_of = base.grads_of
    monkeypatch.setattr(base, "grads_of", lambda ps: (read_in_python.append(1), grads_of(ps))[1])
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    grads = grad_stream(ours_params)

    def step_both(drop=None):
        g = next(grads)
        if drop is not None:
            g[drop] = None
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, g)
            opt.step()

    for _ in range(3):
        step_both()
    read_in_python.clear()
    step_both()
    reads_in_cpp = backend == "cpp" and fused_opt._ops.direct_module() is not None  # accelerator
    assert read_in_python == ([] if reads_in_cpp else [1])
    step_both(drop=1)  # a param without a grad: the Python path, a new plan
    assert read_in_python

    class Watching(torch.overrides.TorchFunctionMode):  # a mode: the op runs, not _C
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watching():
        step_both()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name, set_to_none, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    train([(ours, ours_params), (ref, ref_params)], 3)
    for opt in (ours, ref):
        opt.zero_grad(set_to_none=set_to_none)
        opt.step()  # no grads (skipped) or zero grads (momentum and averages still move)
    for p in ours_params:
        assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_clip_grad_norm_before_step(name, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    grads = grad_stream(ours_params)
    for _ in range(6):
        step_grads = [10 * g for g in next(grads)]
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, step_grads)
            norm = nn.utils.clip_grad_norm_(params, max_norm=1.0)
            assert norm > 1.0
            opt.step()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


# ---- schedulers ---------------------------------------------------------------------------------
SCHEDULER_STEPS = 16
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[2, 5, 9], gamma=0.3),
    "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=4),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=10, power=2.0),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=3, T_mult=2
    ),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch)),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.9),
    # cycle_momentum (the default) cycles SGD's momentum and Adam's beta1.
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=SCHEDULER_STEPS, pct_start=0.4
    ),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(
        opt, base_lr=0.001, max_lr=0.1, step_size_up=3, base_momentum=0.7, max_momentum=0.95
    ),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, 0.1, total_iters=3), lr_scheduler.ExponentialLR(opt, 0.8)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(opt, 0.5, total_iters=3), lr_scheduler.ExponentialLR(opt, 0.9)]
    ),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    "SWALR": lambda opt: SWALR(opt, swa_lr=0.01, anneal_epochs=4),
}


def test_every_torch_scheduler_is_covered():
    """A scheduler added to torch.optim.lr_scheduler must be added to SCHEDULERS."""
    torch_schedulers = {
        name
        for name, cls in vars(lr_scheduler).items()
        if inspect.isclass(cls)
        and issubclass(cls, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
        and cls.__module__ == lr_scheduler.__name__
        and name not in ("LRScheduler", "_LRScheduler")
    }
    assert torch_schedulers <= set(SCHEDULERS), torch_schedulers - set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_scheduler_gives_torch_optims_trajectory(name, scheduler, backend, device):
    # momentum != 0 so that OneCycleLR and CyclicLR have a momentum to cycle.
    kwargs = {**FULL_STATE[name], "lr": 0.05}
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **kwargs)
    ours_scheduler, ref_scheduler = SCHEDULERS[scheduler](ours), SCHEDULERS[scheduler](ref)
    plateau = [1.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    hyper = ("lr", "momentum", "betas")
    seen: list[list] = []

    def schedule(step: int) -> None:
        for sched in (ours_scheduler, ref_scheduler):
            if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
                sched.step(plateau[step])
            else:
                sched.step()
        values = [[g.get(k) for k in hyper] for g in ours.param_groups]
        assert values == [[g.get(k) for k in hyper] for g in ref.param_groups]
        seen.append(values)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train([(ours, ours_params), (ref, ref_params)], SCHEDULER_STEPS, after_step=schedule)
    # torch warns when the scheduler thinks optimizer.step() was not called first.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert len({str(v) for v in seen}) > 1, "the scheduler never changed a hyper-parameter"
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


# ---- params of other kinds ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_complex_params_match_torch(name, backend, device):
    kwargs = {**FULL_STATE[name], "maximize": True}
    # A complex and a real param in one group: the complex one is updated as real pairs.
    ours, ours_params, ref, ref_params = _twins(
        name, _plain, backend, device, shapes=[(9,), (2, 3)], dtype=torch.complex64, **kwargs
    )
    real = make_params([(4,)], device=device, seed=3)
    ours_params, ref_params = ours_params + clone_params(real), ref_params + clone_params(real)
    ours.add_param_group({"params": ours_params[-1:]})
    ref.add_param_group({"params": ref_params[-1:]})
    train([(ours, ours_params), (ref, ref_params)], 10)
    assert ours_params[0].is_complex()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_strided_params(name, backend, device):
    """State is created like the param (preserve_format); grads may have other strides."""
    conv = torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    transposed = torch.randn(6, 8, device=device).t()
    params = [conv.requires_grad_(), transposed.requires_grad_()]
    ours_params, ref_params = clone_params(params), clone_params(params)
    for p, q in zip(ours_params, params, strict=True):
        assert p.stride() == q.stride()
    ours = FUSED_CLASSES[name](ours_params, backend=backend, **FULL_STATE[name])
    ref = TORCH_CLASSES[name](ref_params, foreach=False, **FULL_STATE[name])
    grads = grad_stream(params)
    for step in range(6):
        # Contiguous grads on odd steps, grads with the param's strides on even ones.
        step_grads = [g if step % 2 else g.clone().as_strided(p.shape, p.stride()).copy_(g)
                      for g, p in zip(next(grads), params, strict=True)]  # fmt: skip
        for opt, ps in ((ours, ours_params), (ref, ref_params)):
            set_grads(ps, step_grads)
            opt.step()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)
    for p, q in zip(ours_params, params, strict=True):
        assert p.stride() == q.stride()


@pytest.mark.parametrize("name", NAMES)
def test_real_training_loop_with_a_module(name, backend, device):
    """The one-line swap: the same nn.Module loop with either import trains identically."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    models = [model.to(device), copy.deepcopy(model)]
    opts = [
        FUSED_CLASSES[name](models[0].parameters(), backend=backend, **FULL_STATE[name]),
        TORCH_CLASSES[name](models[1].parameters(), foreach=False, **FULL_STATE[name]),
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        x = torch.randn(32, 8, generator=gen).to(device)
        y = torch.randint(0, 3, (32,), generator=gen).to(device)
        for m, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    params = [list(m.parameters()) for m in models]
    assert_same_state(opts[0], params[0], opts[1], params[1], **FP32)


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_are_accepted_like_torch(name, backend, device):
    model = nn.Linear(4, 2).to(device)
    opt = FUSED_CLASSES[name](model.named_parameters(), backend=backend)
    ref = TORCH_CLASSES[name](nn.Linear(4, 2).named_parameters())
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"]
    model(torch.randn(3, 4, device=device)).sum().backward()
    opt.step()
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_runs_torch_optims_implementation(name, backend, device):
    """differentiable=True delegates to torch.optim: the update itself has a gradient."""
    kwargs = {**FULL_STATE[name], "differentiable": True}
    p = torch.randn(5, device=device, requires_grad=True)
    w = p.clone()  # a non-leaf "param", as in meta-learning
    opt = FUSED_CLASSES[name]([w], backend=backend, **kwargs)
    w.grad = torch.randn(5, device=device)
    opt.step()
    w.sum().backward()
    assert p.grad is not None and p.grad.isfinite().all()


@pytest.mark.parametrize("name", NAMES)
def test_the_reported_backend_is_the_one_that_runs(name, backend, device):
    """The torch backend runs aten's ops (torch's fused kernel where it is correct, else its
    foreach ops); a compiled backend runs one fused_opt op instead."""
    params = make_params(device=device)
    opt = FUSED_CLASSES[name](params, backend=backend, **FULL_STATE[name])
    train([(opt, params)], 1)  # the first step creates the state
    set_grads(params, next(grad_stream(params)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    ran = {event.name for event in prof.events()}
    foreach_ops = {n for n in ran if n.startswith(("aten::_foreach_", "aten::_fused_"))}
    assert opt.backend == backend
    if backend == "torch":
        assert foreach_ops, ran
    else:
        assert f"fused_opt::{opt._op}" in ran, ran
        assert not foreach_ops, foreach_ops


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(fused=True), dict(foreach=False)])
@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_fused_flags_are_accepted_and_kept(name, flags, backend, device):
    """They are stored like torch.optim stores them (checkpoints stay compatible); ``backend``
    alone chooses what runs."""
    ours, ours_params, ref, ref_params = _twins(name, _plain, backend, device, **FULL_STATE[name])
    flagged = FUSED_CLASSES[name](clone_params(ours_params), backend=backend, **flags,
                                  **FULL_STATE[name])  # fmt: skip
    ref_flagged = TORCH_CLASSES[name](clone_params(ref_params), **flags, **FULL_STATE[name])
    assert flagged.state_dict()["param_groups"] == ref_flagged.state_dict()["param_groups"]
    flagged_params = flagged.param_groups[0]["params"]
    train([(ours, ours_params), (flagged, flagged_params), (ref, ref_params)], 5)
    assert_same_state(flagged, flagged_params, ours, ours_params, rtol=0, atol=0)
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)
