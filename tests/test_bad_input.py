"""Bad input fails the way torch.optim fails (same exception type), before any tensor is modified.

Every failing step is checked against a snapshot of the params and the whole optimizer state:
a failed step must leave nothing half-updated, not even a step count.
"""

from __future__ import annotations

import pytest
import torch
from _reference import (
    FUSED_CLASSES,
    TORCH_CLASSES,
    assert_unchanged,
    clone_params,
    make_params,
    snapshot,
    train,
)
from torch import nn

import fused_opt
from fused_opt import functional

pytestmark = pytest.mark.usefixtures("single_threaded")

NAMES = ["SGD", "Adam", "AdamW"]
FULL_STATE = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "Adam": dict(lr=0.05, amsgrad=True),
    "AdamW": dict(lr=0.05, amsgrad=True),
}

# ---- constructor arguments ----------------------------------------------------------------------
_ADAM_INVALID = [
    dict(lr=-1e-3),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(weight_decay=-0.1),
    dict(fused=True, foreach=True),
    dict(fused=True, differentiable=True),
]
INVALID_ARGUMENTS = [
    *[("SGD", kwargs) for kwargs in [
        dict(lr=-0.1),
        dict(momentum=-0.5),
        dict(weight_decay=-1e-4),
        dict(nesterov=True),  # without momentum
        dict(nesterov=True, momentum=0.9, dampening=0.1),
        dict(fused=True, foreach=True),
        dict(fused=True, differentiable=True),
    ]],
    *[("Adam", kwargs) for kwargs in _ADAM_INVALID],
    *[("AdamW", kwargs) for kwargs in _ADAM_INVALID],
]  # fmt: skip


def _torch_error(call) -> BaseException:
    try:
        call()
    except Exception as exc:  # the oracle: whatever torch.optim raises
        return exc
    raise AssertionError("torch.optim accepted this input: it is not a bad-input case")


def _case_id(name: str, kwargs: dict) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.mark.parametrize(
    ("name", "kwargs"), [pytest.param(n, k, id=_case_id(n, k)) for n, k in INVALID_ARGUMENTS]
)
def test_invalid_arguments_raise_like_torch(name, kwargs, backend, device):
    params = make_params(device=device)
    before = [p.detach().clone() for p in params]
    expected = _torch_error(lambda: TORCH_CLASSES[name](clone_params(params), **kwargs))
    with pytest.raises(type(expected)) as raised:
        FUSED_CLASSES[name](params, backend=backend, **kwargs)
    assert str(raised.value) == str(expected)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda: [], id="empty"),
        pytest.param(lambda: [torch.ones(3, requires_grad=True) * 2], id="non-leaf"),
        pytest.param(lambda: torch.ones(3, requires_grad=True), id="a-tensor-not-a-list"),
    ],
)
def test_invalid_params_raise_like_torch(name, params):
    expected = _torch_error(lambda: TORCH_CLASSES[name](params()))
    with pytest.raises(type(expected)) as raised:
        FUSED_CLASSES[name](params(), backend="torch")
    assert str(raised.value) == str(expected)


# ---- backend choice -----------------------------------------------------------------------------
def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="'fastest'.*auto, cpp, cuda, torch"):
        fused_opt.SGD(make_params(), backend="fastest")


def test_unavailable_backend_is_a_runtime_error_that_says_why():
    missing = [b for b in ("cpp", "cuda") if b not in fused_opt.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=f"backend '{missing[0]}' is not available"):
        fused_opt.Adam(make_params(), backend=missing[0])


def test_unavailable_backend_from_the_environment_fails_at_construction(monkeypatch):
    missing = [b for b in ("cpp", "cuda") if b not in fused_opt.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    monkeypatch.setenv("FUSED_OPT_BACKEND", missing[0])
    with pytest.raises(RuntimeError, match="not available"):
        fused_opt.AdamW(make_params())


@pytest.mark.cuda
def test_compiled_backend_on_params_of_another_device_is_a_value_error():
    if "cuda" not in fused_opt.available_backends():
        pytest.skip("the CUDA backend is not available here")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        fused_opt.SGD(make_params(), backend="cuda")
    opt = fused_opt.SGD(make_params(device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        opt.add_param_group({"params": make_params()})
    assert len(opt.param_groups) == 1


# ---- sparse gradients ---------------------------------------------------------------------------
def _sparse(dense: torch.Tensor) -> torch.Tensor:
    return dense.to_sparse() if dense.dim() > 0 else dense.reshape(1).to_sparse()


@pytest.mark.parametrize("steps_before", [0, 3], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_raises_like_torch_and_modifies_nothing(name, steps_before, backend, device):
    # fp32 and fp64 params in one group: the dense fp32 bucket must not run before the error.
    params = make_params([(4,), (3, 3)], device=device) + make_params(
        [(5,), (2, 2)], dtype=torch.float64, device=device
    )
    opt = FUSED_CLASSES[name](params, backend=backend, **FULL_STATE[name])
    train([(opt, params)], steps_before)
    for p in params:
        p.grad = torch.ones_like(p)
    params[3].grad = _sparse(torch.ones_like(params[3]))
    before = snapshot(opt, params)
    ref_params = clone_params(params)
    ref = TORCH_CLASSES[name](ref_params, **FULL_STATE[name])
    for p, q in zip(params, ref_params, strict=True):
        q.grad = p.grad.clone()
    expected = _torch_error(ref.step)
    with pytest.raises(type(expected), match="sparse gradients"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_with_sparse_grads_trains_like_torch(momentum):
    models = [nn.Embedding(10, 3, sparse=True) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [
        fused_opt.SGD(models[0].parameters(), lr=0.1, momentum=momentum, backend="torch"),
        torch.optim.SGD(models[1].parameters(), lr=0.1, momentum=momentum),
    ]
    for step in range(3):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model(torch.tensor([step, 2 * step + 1])).sum().backward()
            opt.step()
    torch.testing.assert_close(models[0].weight, models[1].weight)


def test_sgd_sparse_grad_in_a_cached_multi_dtype_group_runs_torchs_step(backend, device):
    """A group whose plan spans two dtypes, then gets a sparse grad: torch.optim's SGD runs."""
    params = [torch.randn(5, device=device), torch.randn(4, device=device, dtype=torch.float64)]
    ours_params, ref_params = clone_params(params), clone_params(params)
    ours = fused_opt.SGD(ours_params, lr=0.1, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    for step in range(4):
        for p, q in zip(ours_params, ref_params, strict=True):
            g = torch.full_like(p, 0.5 + step)
            p.grad, q.grad = (_sparse(g), _sparse(g)) if step == 3 else (g, g.clone())
        ours.step()
        ref.step()
    for p, q in zip(ours_params, ref_params, strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("steps_before", [0, 3], ids=["first-step", "cached-plan"])
def test_sgd_sparse_grad_where_torch_fails_raises_and_modifies_nothing(
    steps_before, backend, device
):
    """torch.optim.SGD cannot apply weight decay to a sparse grad; fused_opt fails first."""
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    params = make_params([(4,), (6,)], device=device)
    opt = fused_opt.SGD(params, backend=backend, **kwargs)
    train([(opt, params)], steps_before)
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = _sparse(torch.ones_like(params[1]))
    ref_params = clone_params(params)
    for p, q in zip(params, ref_params, strict=True):
        q.grad = p.grad.clone()
    expected = _torch_error(torch.optim.SGD(ref_params, **kwargs).step)
    before = snapshot(opt, params)
    with pytest.raises(type(expected)):
        opt.step()
    assert_unchanged(opt, params, before)


# ---- mismatched state dicts ---------------------------------------------------------------------
def _trained(name: str, shapes, backend: str, device: torch.device, groups: int = 1):
    params = make_params(shapes, device=device)
    per_group = [params[i::groups] for i in range(groups)]
    opt = FUSED_CLASSES[name](
        [{"params": g} for g in per_group], backend=backend, **FULL_STATE[name]
    )
    train([(opt, params)], 2)
    return opt, params


@pytest.mark.parametrize("mismatch", ["group-count", "group-size"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_with_other_groups_is_refused_like_torch(name, mismatch, backend, device):
    shapes = [(3,), (4,), (5,), (6,)]
    opt, params = _trained(name, shapes, backend, device)
    other_params = shapes[:3] if mismatch == "group-size" else shapes
    other, _ = _trained(
        name, other_params, backend, device, groups=2 if mismatch == "group-count" else 1
    )
    bad = other.state_dict()
    ref = TORCH_CLASSES[name](clone_params(params), **FULL_STATE[name])
    expected = _torch_error(lambda: ref.load_state_dict(bad))
    before = snapshot(opt, params)
    with pytest.raises(type(expected)) as raised:
        opt.load_state_dict(bad)
    assert str(raised.value) == str(expected)
    assert_unchanged(opt, params, before)
    train([(opt, params)], 1)  # and it still trains


@pytest.mark.parametrize("name", NAMES)
def test_state_with_wrong_shapes_fails_at_step_and_modifies_nothing(name, backend, device):
    """torch.optim loads state of the wrong shape silently and fails in the step, after updating
    `step`; fused_opt raises the same exception type before it modifies anything."""
    opt, params = _trained(name, [(3,), (4,), (5,)], backend, device)
    bad = opt.state_dict()
    for state in bad["state"].values():
        for key, value in state.items():
            if key != "step":
                state[key] = torch.zeros(value.numel() + 1, device=value.device)
    ref_params = clone_params(params)
    ref = TORCH_CLASSES[name](ref_params, foreach=False, **FULL_STATE[name])
    ref.load_state_dict(bad)  # torch.optim accepts it
    opt.load_state_dict(bad)
    for p, q in zip(params, ref_params, strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    expected = _torch_error(ref.step)
    before = snapshot(opt, params)
    with pytest.raises(type(expected), match="shape"):
        opt.step()
    assert_unchanged(opt, params, before)


# ---- the functional API and the ops -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    ["grad-shape", "grad-dtype", "state-shape", "state-dtype", "missing-state", "grad-count"],
)
def test_functional_adam_checks_before_it_writes(bad, backend, device):
    params = make_params([(4,), (6,)], device=device)
    grads = [torch.ones_like(p) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    if bad == "grad-shape":
        grads[1] = torch.ones(7, device=device)
    elif bad == "grad-dtype":
        grads[1] = grads[1].double()
    elif bad == "state-shape":
        exp_avg_sqs[1] = torch.zeros(2, 3, device=device)
    elif bad == "state-dtype":
        exp_avgs[1] = exp_avgs[1].half()
    elif bad == "missing-state":
        exp_avgs.pop()
    else:
        grads.pop()
    tensors = [params, grads, exp_avgs, exp_avg_sqs, steps]
    before = [[t.detach().clone() for t in ts] for ts in tensors]
    with pytest.raises(RuntimeError):
        functional.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=0.1, backend=backend)
    for ts, olds in zip(tensors, before, strict=True):
        for t, old in zip(ts, olds, strict=True):
            assert torch.equal(t.detach(), old), f"{bad}: a tensor was modified"


@pytest.mark.parametrize("bad", ["grad-shape", "grad-dtype", "buffer-shape", "missing-buffer"])
def test_functional_sgd_checks_before_it_writes(bad, backend, device):
    params = make_params([(4,), (6,)], device=device)
    grads = [torch.ones_like(p) for p in params]
    buffers = [torch.ones_like(p) for p in params]
    if bad == "grad-shape":
        grads[0] = torch.ones(2, 2, device=device)
    elif bad == "grad-dtype":
        grads[1] = grads[1].to(torch.bfloat16)
    elif bad == "buffer-shape":
        buffers[1] = torch.ones(5, device=device)
    else:
        buffers.pop()
    before = [[t.detach().clone() for t in ts] for ts in (params, grads, buffers)]
    with pytest.raises(RuntimeError):
        functional.sgd(params, grads, buffers, lr=0.1, momentum=0.9, backend=backend)
    for ts, olds in zip((params, grads, buffers), before, strict=True):
        for t, old in zip(ts, olds, strict=True):
            assert torch.equal(t.detach(), old), f"{bad}: a tensor was modified"


def test_a_grad_of_the_wrong_shape_is_refused_by_torch_itself():
    """Through the optimizer classes a wrong-shape grad cannot even be assigned."""
    p = torch.zeros(4, requires_grad=True)
    with pytest.raises(RuntimeError):
        p.grad = torch.zeros(5)


@pytest.mark.parametrize("name", NAMES)
def test_a_failing_closure_modifies_nothing(name, backend, device):
    params = make_params(device=device)
    opt = FUSED_CLASSES[name](params, backend=backend, **FULL_STATE[name])
    train([(opt, params)], 2)
    before = snapshot(opt, params)

    def closure():
        raise ValueError("the model blew up")

    with pytest.raises(ValueError, match="blew up"):
        opt.step(closure)
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("name", NAMES)
def test_a_param_in_two_groups_is_refused_like_torch(name, backend, device):
    params = make_params(device=device)
    opt = FUSED_CLASSES[name](params[:3], backend=backend)
    ref = TORCH_CLASSES[name](clone_params(params)[:3])
    expected = _torch_error(
        lambda: ref.add_param_group({"params": ref.param_groups[0]["params"][:1]})
    )
    with pytest.raises(type(expected)) as raised:
        opt.add_param_group({"params": params[:1]})
    assert str(raised.value) == str(expected)
    assert len(opt.param_groups) == 1
    train([(opt, params[:3])], 1)  # and it still trains
