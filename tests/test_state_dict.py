"""state_dict: torch.optim's exact format, lossless both ways, resumable bit for bit.

A checkpoint written by fused_opt loads into torch.optim and one written by torch.optim loads
here; ``torch.load(weights_only=True)`` and ``map_location`` work; an optimizer survives deepcopy
and pickle. (Resuming a realistic loop in a new process is tests/test_resume.py.)
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
from _reference import (
    FUSED_CLASSES,
    TIGHT,
    TORCH_CLASSES,
    assert_same_state,
    clone_params,
    grad_stream,
    make_params,
    set_grads,
    train,
)

pytestmark = pytest.mark.usefixtures("single_threaded")

SHAPES = [(), (5,), (17,), (3, 4)]
FP32 = TIGHT[torch.float32]
BITWISE = {"rtol": 0, "atol": 0}
CONFIGS = [
    pytest.param("SGD", dict(lr=0.05), id="SGD"),
    pytest.param("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                 id="SGD-momentum"),
    pytest.param("Adam", dict(lr=0.05), id="Adam"),
    pytest.param("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01), id="Adam-amsgrad"),
    pytest.param("Adam", dict(lr=0.05, decoupled_weight_decay=True, weight_decay=0.1),
                 id="Adam-decoupled"),
    pytest.param("AdamW", dict(lr=0.05, amsgrad=True), id="AdamW-amsgrad"),
]  # fmt: skip
FROZEN = 2  # one param never gets a grad: it has no state entry


def _frozen_stream(params: list[torch.Tensor], seed: int = 1):
    for grads in grad_stream(params, seed):
        grads[FROZEN] = None
        yield grads


def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, grads) -> None:
    for _ in range(steps):
        set_grads(params, next(grads))
        opt.step()


def _trained_twins(name: str, kwargs: dict[str, Any], backend: str, params, steps: int, stream):
    """fused_opt and torch.optim optimizers over copies of ``params``, both trained ``steps``
    steps on the grads of ``stream(params)``."""
    ours_params, ref_params = clone_params(params), clone_params(params)
    ours = FUSED_CLASSES[name](ours_params, backend=backend, **kwargs)
    ref = TORCH_CLASSES[name](ref_params, **kwargs)
    for opt, ps in ((ours, ours_params), (ref, ref_params)):
        _train(opt, ps, steps, stream(params))
    return ours, ours_params, ref, ref_params


def _save(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    return buffer.getvalue()


def _load(blob: bytes, cls: type, kwargs: dict[str, Any], map_location=None, **extra: Any):
    """Params and a new ``cls`` optimizer restored from a checkpoint, as a user resumes."""
    checkpoint = torch.load(io.BytesIO(blob), weights_only=True, map_location=map_location)
    params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    opt = cls(params, **kwargs, **extra)
    opt.load_state_dict(checkpoint["optimizer"])
    return opt, params, checkpoint["optimizer"]


def _assert_state_dicts_equal(actual: dict, expected: dict) -> None:
    """Same structure, same hyper-parameters, same tensors bit for bit (dtype and device too)."""
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert actual["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            torch.testing.assert_close(actual["state"][index][key], value, **BITWISE)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_state_dict_has_torch_optims_format(name, kwargs, backend, device):
    params = make_params(SHAPES, device=device)
    ours, _, ref, _ = _trained_twins(name, kwargs, backend, params, 3, _frozen_stream)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() == {"state", "param_groups"}
    assert sd["param_groups"] == ref_sd["param_groups"]
    assert sd["state"].keys() == ref_sd["state"].keys()
    assert FROZEN not in sd["state"]
    for index, ref_state in ref_sd["state"].items():
        state = sd["state"][index]
        assert state.keys() == ref_state.keys(), index
        for key, value in ref_state.items():
            if key == "step":  # a float32 scalar tensor on the CPU, as torch.optim keeps it
                assert state[key].dtype == torch.float32 and state[key].shape == ()
                assert state[key].device == value.device == torch.device("cpu")
            else:
                assert (state[key].dtype, state[key].device) == (value.dtype, value.device)
            torch.testing.assert_close(state[key], value, **FP32)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_resume_from_a_checkpoint_is_bitwise_an_uninterrupted_run(name, kwargs, backend, device):
    params = make_params(SHAPES, device=device)
    cls = FUSED_CLASSES[name]
    whole_params = clone_params(params)
    whole = cls(whole_params, backend=backend, **kwargs)
    _train(whole, whole_params, 10, _frozen_stream(params))

    first_params = clone_params(params)
    first = cls(first_params, backend=backend, **kwargs)
    grads = _frozen_stream(params)
    _train(first, first_params, 5, grads)
    resumed, resumed_params, checkpoint = _load(
        _save(first, first_params), cls, kwargs, backend=backend
    )
    _assert_state_dicts_equal(resumed.state_dict(), checkpoint)
    _train(resumed, resumed_params, 5, grads)
    assert_same_state(resumed, resumed_params, whole, whole_params, **BITWISE)


@pytest.mark.parametrize("direction", ["fused_opt-to-torch", "torch-to-fused_opt"])
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_checkpoint_moves_between_fused_opt_and_torch_optim(
    name, kwargs, direction, backend, device
):
    params = make_params(SHAPES, device=device)
    ours = (FUSED_CLASSES[name], {"backend": backend})
    theirs = (TORCH_CLASSES[name], {"foreach": False})
    (writer, writer_extra), (reader, reader_extra) = (
        (ours, theirs) if direction == "fused_opt-to-torch" else (theirs, ours)
    )
    whole_params = clone_params(params)
    whole = writer(whole_params, **kwargs, **writer_extra)
    _train(whole, whole_params, 10, _frozen_stream(params))

    first_params = clone_params(params)
    first = writer(first_params, **kwargs, **writer_extra)
    grads = _frozen_stream(params)
    _train(first, first_params, 5, grads)
    resumed, resumed_params, checkpoint = _load(
        _save(first, first_params), reader, kwargs, **reader_extra
    )
    # Loading is lossless (the groups' values, `foreach` included, come from the checkpoint) ...
    _assert_state_dicts_equal(resumed.state_dict(), checkpoint)
    # ... and training continues as if the writer had never stopped.
    _train(resumed, resumed_params, 5, grads)
    assert_same_state(resumed, resumed_params, whole, whole_params, **FP32)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_load_with_map_location(name, kwargs, backend, device):
    """A checkpoint written on one device resumes on ``device`` (CPU -> CPU, CPU -> CUDA)."""
    params = make_params(SHAPES)
    cpu_params = clone_params(params)
    cls = FUSED_CLASSES[name]
    writer = cls(cpu_params, backend="torch", **kwargs)
    grads = _frozen_stream(params)
    _train(writer, cpu_params, 4, grads)
    blob = _save(writer, cpu_params)
    resumed, resumed_params, _ = _load(blob, cls, kwargs, map_location=str(device), backend=backend)
    assert all(p.device == device for p in resumed_params)
    for state in resumed.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.device == device
    later = [next(grads) for _ in range(4)]
    _train(writer, cpu_params, 4, iter(later))
    _train(
        resumed, resumed_params, 4, ([g if g is None else g.to(device) for g in gs] for gs in later)
    )
    for p, q in zip(resumed_params, cpu_params, strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), **FP32)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_loading_an_older_state_dict_into_a_running_optimizer(name, kwargs, backend, device):
    """Rolling back mid-run: nothing cached from the later steps survives the load."""
    params = make_params(SHAPES, device=device)
    cls = FUSED_CLASSES[name]
    run_params = clone_params(params)
    opt = cls(run_params, backend=backend, **kwargs)
    _train(opt, run_params, 3, _frozen_stream(params))
    blob = _save(opt, run_params)
    _train(opt, run_params, 3, _frozen_stream(params, seed=5))

    checkpoint = torch.load(io.BytesIO(blob), weights_only=True)
    with torch.no_grad():
        for p, saved in zip(run_params, checkpoint["params"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(checkpoint["optimizer"])
    fresh, fresh_params, _ = _load(blob, cls, kwargs, backend=backend)
    for o, ps in ((opt, run_params), (fresh, fresh_params)):
        _train(o, ps, 4, _frozen_stream(params, seed=9))
    assert_same_state(opt, run_params, fresh, fresh_params, **BITWISE)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_optimizer_survives_deepcopy_and_pickle(name, kwargs, how, backend, device):
    params = make_params(SHAPES, device=device)
    opt = FUSED_CLASSES[name](params, backend=backend, **kwargs)
    train([(opt, params)], 3)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = twin.param_groups[0]["params"]
    assert twin.backend == opt.backend == backend
    assert all(p is not q for p, q in zip(twin_params, params, strict=True))
    train([(opt, params), (twin, twin_params)], 4, seed=3)
    assert_same_state(twin, twin_params, opt, params, **BITWISE)


# ---- state layout ---------------------------------------------------------------------------
# The state a step creates for many params is carved from one buffer per kind (optim/_base.py,
# state_like); torch.optim gives each param its own. The values, shapes, strides and the
# checkpoint must not show the difference.
CHANNELS_LAST = 4  # index of the channels_last param below: it gets a tensor of its own


def _layout_params(device: torch.device) -> list[torch.Tensor]:
    params = make_params([(), (5,), (17,), (3, 4), (2, 3, 4, 5), (0,), (300,)], device=device)
    params[CHANNELS_LAST] = (
        params[CHANNELS_LAST].detach().to(memory_format=torch.channels_last).requires_grad_()
    )
    return params


def _autograd_layout_stream(params: list[torch.Tensor]):
    """Grads laid out like their params, as autograd accumulates them (torch.optim's SGD copies
    the first grad's layout into its momentum buffer)."""
    for grads in grad_stream(params):
        yield [g.to(memory_format=torch.channels_last) if g.dim() == 4 else g for g in grads]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_new_state_is_carved_from_one_buffer_per_kind(name, kwargs, backend, device):
    ours, ours_params, ref, ref_params = _trained_twins(
        name, kwargs, backend, _layout_params(device), 2, _autograd_layout_stream
    )
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)

    kinds = [key for key in ref.state[ref_params[0]] if key != "step"]
    buffers = []
    for key in kinds:
        carved = [ours.state[p][key] for i, p in enumerate(ours_params) if i != CHANNELS_LAST]
        storages = {t.untyped_storage().data_ptr() for t in carved}
        assert len(storages) == 1, key
        buffers.append(storages.pop())
        assert all(t.data_ptr() % 64 == 0 for t in carved), key
        for p, ref_p in zip(ours_params, ref_params, strict=True):
            state, ref_state = ours.state[p][key], ref.state[ref_p][key]
            assert (state.shape, state.stride()) == (ref_state.shape, ref_state.stride()), key
        own = ours.state[ours_params[CHANNELS_LAST]][key]
        assert own.is_contiguous(memory_format=torch.channels_last)
        assert own.untyped_storage().data_ptr() not in buffers
    assert len(set(buffers)) == len(kinds)  # no two kinds share memory


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CONFIGS if c.id != "SGD"])  # has state
def test_carved_state_tensors_count_their_own_versions(name, kwargs, backend, device):
    """Carved CPU state shares memory, not version counters: each tensor has its own, as
    torch.optim's state does (views of one buffer would all share the buffer's)."""
    if device.type != "cpu":
        pytest.skip("only CPU state is carved with counters of its own (see optim/_base.py)")
    ours, ours_params, _, _ = _trained_twins(
        name, kwargs, backend, _layout_params(device), 2, _autograd_layout_stream
    )
    carved = [p for i, p in enumerate(ours_params) if i != CHANNELS_LAST]
    assert ours.state[carved[0]]
    for key in ours.state[carved[0]]:
        first, *others = [ours.state[p][key] for p in carved]
        assert first._base is None, key
        before = [t._version for t in others]
        first.add_(0)
        assert first._version > 0 and [t._version for t in others] == before, key


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CONFIGS if c.values[0] != "SGD"])
def test_new_steps_are_carved_from_one_buffer(name, kwargs, backend, device):
    params = make_params([(3,), (5, 2), (7,)], device=device)
    ours, ours_params, ref, ref_params = _trained_twins(
        name, kwargs, backend, params, 3, grad_stream
    )
    steps = [ours.state[p]["step"] for p in ours_params]
    assert len({t.untyped_storage().data_ptr() for t in steps}) == 1
    for step, ref_p in zip(steps, ref_params, strict=True):
        ref_step = ref.state[ref_p]["step"]
        assert (step.shape, step.dtype, step.device) == (
            ref_step.shape,
            ref_step.dtype,
            ref_step.device,
        )
        assert step.item() == ref_step.item() == 3


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_a_checkpoint_stores_carved_state_once(name, kwargs, backend, device):
    shapes = [(1000,), (3, 333), (4097,), (64, 64)]
    params = make_params(shapes, device=device)
    ours, ours_params, ref, ref_params = _trained_twins(
        name, kwargs, backend, params, 2, grad_stream
    )
    # The buffer is written once, not once per view: the size of torch.optim's checkpoint,
    # plus at most a cache line of padding per tensor.
    padding = 64 * len(shapes) * len(ours.state[ours_params[0]])
    assert len(_save(ours, ours_params)) <= len(_save(ref, ref_params)) + padding


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_resume_into_a_model_moved_to_channels_last(name, kwargs, backend, device):
    """A checkpoint of a contiguous model, resumed after ``model.to(memory_format=
    torch.channels_last)``: state and params disagree on strides. Training goes on exactly as
    torch.optim's does, and the plan re-lays the state out like its param once."""
    params = make_params([(4, 3, 2, 5), (7,)], device=device)
    first_params = clone_params(params)
    first = TORCH_CLASSES[name](first_params, **kwargs)
    _train(first, first_params, 2, grad_stream(params))  # contiguous grads, contiguous state
    blob = _save(first, first_params)
    resumed = {}
    for cls, extra in ((FUSED_CLASSES[name], {"backend": backend}), (TORCH_CLASSES[name], {})):
        opt, ps, _ = _load(blob, cls, kwargs, **extra)
        ps[0].data = ps[0].data.to(memory_format=torch.channels_last)  # what Module.to does
        resumed[cls] = (opt, ps)
    grads = _autograd_layout_stream(params)
    later = [next(grads) for _ in range(3)]
    for opt, ps in resumed.values():
        _train(opt, ps, 3, iter(later))
    (ours, ours_params), (ref, ref_params) = resumed.values()
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)
    for state in ours.state[ours_params[0]].values():
        if state.dim() == 4:
            assert state.is_contiguous(memory_format=torch.channels_last)


# ---- state replaced between steps --------------------------------------------------------------
# The optimizers cache each group's state lists (optim/_base.py, Plan). User code replaces state
# between steps, through every door of the dicts; torch.optim reads the dicts at every step, and
# the cached lists must follow it (optim/_state.py).
def _copy_tensors(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _set_each_tensor(opt, params):  # `state[k] = v.to(device)`, as offloading code does
    for state in opt.state.values():
        for key, value in _copy_tensors(state).items():
            state[key] = value


def _replace_each_dict(opt, params):  # Lightning's _optimizer_to_device
    for p in list(opt.state):
        opt.state[p] = _copy_tensors(opt.state[p])


def _update_each_dict(opt, params):
    for state in opt.state.values():
        state.update(_copy_tensors(state))


def _reset(opt, params):
    from collections import defaultdict

    opt.state = defaultdict(dict)


def _clear(opt, params):
    opt.state.clear()


def _forget_one(opt, params):
    if params[0] in opt.state:  # plain SGD keeps no state
        del opt.state[params[0]]


def _restart_step(opt, params):  # a warm restart of Adam's bias correction
    for state in opt.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"])


CHANGES = [_set_each_tensor, _replace_each_dict, _update_each_dict, _reset, _clear, _forget_one,
           _restart_step]  # fmt: skip


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_state_replaced_between_steps_is_followed(name, kwargs, change, backend, device):
    params = make_params(SHAPES, device=device)
    ours, ours_params, ref, ref_params = _trained_twins(name, kwargs, backend, params, 3,
                                                        grad_stream)  # fmt: skip
    change(ours, ours_params)
    change(ref, ref_params)
    for opt, ps in ((ours, ours_params), (ref, ref_params)):
        _train(opt, ps, 3, grad_stream(params, seed=5))
    assert_same_state(ours, ours_params, ref, ref_params, **FP32)
    _assert_state_dicts_equal(ours.state_dict(), ours.state_dict())  # plain, complete dicts
    assert all(type(state) is dict for state in ours.state_dict()["state"].values())


def test_state_dicts_are_torch_optims_types(backend, device):
    """``opt.state`` stays a defaultdict of dicts for code that checks, and its watched copies
    never reach a checkpoint: it loads with weights_only and without fused_opt's classes."""
    from collections import defaultdict

    params = make_params(SHAPES, device=device)
    opt = FUSED_CLASSES["Adam"](params, backend=backend)
    train([(opt, params)], 2)
    assert isinstance(opt.state, defaultdict)
    assert all(isinstance(state, dict) for state in opt.state.values())
    opt.state = {params[0]: {"step": torch.tensor(1.0)}}
    assert isinstance(opt.state, defaultdict) and opt.state[params[1]] == {}
    blob = pickle.dumps(opt.state_dict())
    assert b"fused_opt" not in blob
