"""Trajectory parity with torch.optim: params and every state tensor, every option, every dtype.

50 steps with fresh random gradients on params of awkward shapes. fp32/fp64 are compared with
torch.optim's for-loop implementation (foreach=False) at tight tolerance. fp16/bf16 follow the
contract "compute in fp32, round once on store": they are compared bit-tight with torch.optim run
on fp32 copies rounded after every step, with torch's fused Adam where it exists, and loosely with
torch's for-loop on fp16/bf16 tensors, which rounds after every op.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from _reference import (
    FUSED_CLASSES,
    TIGHT,
    TORCH_CLASSES,
    RoundedFp32Oracle,
    assert_close_to_scale,
    assert_same_state,
    assert_same_tensors,
    clone_params,
    grad_stream,
    make_params,
    set_grads,
    states_of,
    train,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STEPS = 50

pytestmark = pytest.mark.usefixtures("single_threaded")


def _sgd_configs() -> list[dict[str, Any]]:
    configs = []
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 0.1), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch.optim rejects these (tested in test_bad_input.py)
        configs.append(
            dict(
                lr=0.01,
                momentum=momentum,
                dampening=dampening,
                nesterov=nesterov,
                weight_decay=weight_decay,
                maximize=maximize,
            )  # fmt: skip
        )
    return configs


def _adam_configs() -> list[tuple[str, dict[str, Any]]]:
    configs = []
    for amsgrad, maximize, weight_decay in itertools.product(
        (False, True), (False, True), (0.0, 0.1)
    ):
        base = dict(lr=0.01, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay)
        configs.append(("Adam", base))
        if weight_decay:
            configs.append(("Adam", {**base, "decoupled_weight_decay": True}))  # L2 vs decoupled
        configs.append(("AdamW", base))
    return configs


def _config_id(name: str, kwargs: dict[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in kwargs.items() if k != "lr" and v not in (0, 0.0, False)]
    return "-".join([name, *shown])


CONFIGS = [("SGD", c) for c in _sgd_configs()] + _adam_configs()
CONFIG_PARAMS = [
    pytest.param(name, kwargs, id=_config_id(name, kwargs)) for name, kwargs in CONFIGS
]
ADAM_CONFIG_PARAMS = [p for p in CONFIG_PARAMS if p.values[0] != "SGD"]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _twins(name: str, kwargs: dict, backend: str, device: torch.device, dtype: torch.dtype,
           **ref_options: Any) -> tuple:  # fmt: skip
    """fused_opt and torch.optim optimizers over identical copies of the same params."""
    params = make_params(dtype=dtype, device=device)
    ours_params, ref_params = clone_params(params), clone_params(params)
    ours = FUSED_CLASSES[name](ours_params, backend=backend, **kwargs)
    ref = TORCH_CLASSES[name](ref_params, **(ref_options or {"foreach": False}), **kwargs)
    return ours, ours_params, ref, ref_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "kwargs"), CONFIG_PARAMS)
def test_matches_torch_for_loop(name, kwargs, dtype, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, dtype)
    train([(ours, ours_params), (ref, ref_params)], STEPS)
    assert_same_state(ours, ours_params, ref, ref_params, **TIGHT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "kwargs"), CONFIG_PARAMS)
def test_a_step_leaves_the_grads_as_they_were(name, kwargs, dtype, backend, device):
    # torch.optim reads p.grad; a kernel that adds the weight decay or the Nesterov term to the
    # grad in place would change what the user's code sees after the step (grad norms, logging).
    params = make_params(dtype=dtype, device=device)
    opt = FUSED_CLASSES[name](params, backend=backend, **kwargs)
    grads = grad_stream(params)
    for _ in range(3):  # the first step (momentum and state created) and two after it
        step_grads = next(grads)
        set_grads(params, step_grads)
        opt.step()
        for p, g in zip(params, step_grads, strict=True):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), CONFIG_PARAMS)
def test_low_precision_is_fp32_math_rounded_once(name, kwargs, dtype, backend, device):
    params = make_params(dtype=dtype, device=device)
    ours_params = clone_params(params)
    ours = FUSED_CLASSES[name](ours_params, backend=backend, **kwargs)
    oracle = RoundedFp32Oracle(name, params, dtype, **kwargs)
    grads = grad_stream(params)
    for _ in range(STEPS):
        step_grads = next(grads)
        set_grads(ours_params, step_grads)
        ours.step()
        oracle.step(step_grads)
    # torch.testing's default fp16/bf16 tolerance: about one rounding step of the dtype.
    assert_same_tensors(ours_params, states_of(ours, ours_params), *oracle.params_and_states())


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), ADAM_CONFIG_PARAMS)
def test_low_precision_adam_matches_torch_fused(name, kwargs, dtype, backend, device):
    # torch's fused SGD is no oracle here: torch 2.13's CPU kernel leaves fp16/bf16 params in
    # 16-element vector chunks unchanged, so only the rounded-fp32 oracle above covers SGD.
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, dtype, fused=True)
    train([(ours, ours_params), (ref, ref_params)], STEPS)
    ours_states, ref_states = states_of(ours, ours_params), states_of(ref, ref_params)
    for state in ref_states:  # fused=True keeps `step` on the param's device
        state["step"] = state["step"].cpu()
    assert_same_tensors(ours_params, ours_states, ref_params, ref_states)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), CONFIG_PARAMS)
def test_low_precision_stays_near_torch_for_loop(name, kwargs, dtype, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, dtype)
    train([(ours, ours_params), (ref, ref_params)], STEPS)
    # torch rounds after every op: after 50 steps the two drift apart by a few percent of scale.
    # In fp16 its Adam can also divide by zero (eps=1e-8 and tiny (1-beta2)*g*g round to 0),
    # so only elements where torch stayed finite are compared; ours, in fp32, must stay finite.
    fraction = {torch.bfloat16: 0.15, torch.float16: 0.03}[dtype]
    for i, (p, q) in enumerate(zip(ours_params, ref_params, strict=True)):
        pairs = [("param", p.detach(), q.detach())]
        assert set(ours.state[p]) == set(ref.state[q])
        for key, value in ref.state[q].items():
            if key == "step":
                assert ours.state[p][key].item() == value.item()
            else:
                assert ours.state[p][key].dtype == dtype
                pairs.append((key, ours.state[p][key], value))
        for what, actual, expected in pairs:
            assert actual.isfinite().all(), f"param {i} {what}: not finite"
            finite = expected.isfinite()
            assert_close_to_scale(actual[finite], expected[finite], fraction, f"param {i} {what}")


# ---- NaN and Inf ------------------------------------------------------------------------------
SPECIAL_CONFIGS = [
    pytest.param("SGD", dict(lr=0.1), id="SGD"),
    pytest.param(
        "SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.1), id="SGD-momentum"
    ),
    pytest.param(
        "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), id="SGD-nesterov"
    ),
    pytest.param("Adam", dict(lr=0.1, weight_decay=0.1), id="Adam-L2"),
    pytest.param("Adam", dict(lr=0.1, amsgrad=True, maximize=True), id="Adam-amsgrad"),
    pytest.param("AdamW", dict(lr=0.1, amsgrad=True), id="AdamW-amsgrad"),
]
SPECIAL_VALUES = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize(("name", "kwargs"), SPECIAL_CONFIGS)
def test_nan_and_inf_in_grads_give_torch_values(name, kwargs, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, torch.float32)

    def poison_grads(step: int) -> None:
        if step in (1, 3):  # into fresh grads, so both runs see the same values
            for params in (ours_params, ref_params):
                for value, p in zip(SPECIAL_VALUES, params[3:], strict=False):
                    p.grad.view(-1)[step : step + 5] = value

    # poison after step i means step i+1 sees it: run the steps by hand.
    grads = grad_stream(ours_params)
    for step in range(6):
        step_grads = next(grads)
        set_grads(ours_params, step_grads)
        set_grads(ref_params, step_grads)
        poison_grads(step)
        ours.step()
        ref.step()
    assert any(p.isnan().any() for p in ours_params), "the special values never reached a param"
    assert_same_state(ours, ours_params, ref, ref_params, **TIGHT[torch.float32])


@pytest.mark.parametrize(("name", "kwargs"), SPECIAL_CONFIGS)
def test_nan_and_inf_in_state_give_torch_values(name, kwargs, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, torch.float32)

    def poison_state(step: int) -> None:
        if step != 1:
            return
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            with torch.no_grad():
                for p in params[3:]:
                    for k, (key, value) in enumerate(sorted(opt.state[p].items())):
                        if key != "step":
                            for j, special in enumerate(SPECIAL_VALUES):
                                value.view(-1)[4 * k + j] = special
                    p.view(-1)[-1] = float("nan")

    train([(ours, ours_params), (ref, ref_params)], 5, after_step=poison_state)
    assert_same_state(ours, ours_params, ref, ref_params, **TIGHT[torch.float32])


def test_inf_in_exp_avg_follows_torch_lerp(backend, device):
    """exp_avg follows torch's lerp: inf + w * (g - inf) is NaN (b1*m + (1-b1)*g would be inf)."""
    ours, ours_params, ref, ref_params = _twins(
        "Adam", dict(lr=0.1), backend, device, torch.float32
    )
    train([(ours, ours_params), (ref, ref_params)], 1)
    for opt, params in ((ours, ours_params), (ref, ref_params)):
        opt.state[params[2]]["exp_avg"][:2] = torch.tensor([float("inf"), float("-inf")])
    train([(ours, ours_params), (ref, ref_params)], 1, seed=2)
    exp_avg = ours.state[ours_params[2]]["exp_avg"]
    assert exp_avg[:2].isnan().all(), f"expected NaN from lerp, got {exp_avg[:2]}"
    assert_same_state(ours, ours_params, ref, ref_params, **TIGHT[torch.float32])


def test_mixed_dtypes_in_one_group(backend, device):
    """One group holding fp32, fp64, bf16 and fp16 params: each dtype keeps its own contract."""
    shapes = [(7,), (1023,), (3, 5)]
    by_dtype = {
        dtype: make_params(shapes, dtype=dtype, device=device, seed=i)
        for i, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    }
    kwargs = dict(lr=0.01, amsgrad=True, weight_decay=0.1)
    ours_params = [p for params in by_dtype.values() for p in clone_params(params)]
    ours = FUSED_CLASSES["AdamW"](ours_params, backend=backend, **kwargs)
    full = [torch.float32, torch.float64]
    ref_params = [p for d in full for p in clone_params(by_dtype[d])]
    ref = TORCH_CLASSES["AdamW"](ref_params, foreach=False, **kwargs)
    oracles = {d: RoundedFp32Oracle("AdamW", by_dtype[d], d, **kwargs) for d in LOW_PRECISION}
    grads = grad_stream(ours_params)
    for _ in range(20):
        step_grads = next(grads)
        set_grads(ours_params, step_grads)
        set_grads(ref_params, step_grads[: len(ref_params)])
        ours.step()
        ref.step()
        for k, dtype in enumerate(LOW_PRECISION):
            start = len(ref_params) + k * len(shapes)
            oracles[dtype].step(step_grads[start : start + len(shapes)])
    n = len(shapes)
    for k, dtype in enumerate(full):
        part = ours_params[k * n : (k + 1) * n]
        assert_same_tensors(
            part, states_of(ours, part), ref_params[k * n : (k + 1) * n],
            states_of(ref, ref_params[k * n : (k + 1) * n]), **TIGHT[dtype],
        )  # fmt: skip
    for k, dtype in enumerate(LOW_PRECISION):
        part = ours_params[len(ref_params) + k * n :][:n]
        assert_same_tensors(part, states_of(ours, part), *oracles[dtype].params_and_states())


# ---- hyper-parameters at the edges of their ranges ----------------------------------------------
EDGE_CONFIGS = [
    ("SGD", dict(lr=0.0, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=1.0, dampening=1.0)),
    ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.5, weight_decay=1.0)),
    ("SGD", dict(lr=10.0, momentum=0.99, nesterov=True, weight_decay=1e-8)),
    ("Adam", dict(lr=0.1, betas=(0.0, 0.0))),
    ("Adam", dict(lr=0.1, betas=(0.5, 0.5), amsgrad=True)),  # lerp weight exactly 0.5
    ("Adam", dict(lr=0.1, betas=(0.3, 0.999))),  # lerp weight above 0.5: torch's other formula
    ("Adam", dict(lr=0.1, betas=(0.9, 0.999), eps=0.0)),
    ("Adam", dict(lr=0.1, eps=1.0, weight_decay=1.0, maximize=True)),
    ("Adam", dict(lr=0.0, amsgrad=True)),
    ("AdamW", dict(lr=0.1, weight_decay=10.0)),  # decay factor 1 - lr * wd = 0
    ("AdamW", dict(lr=1.0, betas=(0.99, 0.9999), eps=1e-12, amsgrad=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("name", "kwargs"), [pytest.param(n, k, id=_config_id(n, k)) for n, k in EDGE_CONFIGS]
)
def test_edge_hyperparameters_match_torch(name, kwargs, dtype, backend, device):
    ours, ours_params, ref, ref_params = _twins(name, kwargs, backend, device, dtype)
    grads = grad_stream(ours_params)
    for _ in range(20):
        step_grads = next(grads)
        for g in step_grads:  # exact zeros: a zero average, and 0/0 where eps == 0
            g.view(-1)[::3] = 0.0
        for opt, params in ((ours, ours_params), (ref, ref_params)):
            set_grads(params, step_grads)
            opt.step()
    assert_same_state(ours, ours_params, ref, ref_params, **TIGHT[dtype])


# ---- random sizes and hyper-parameters -----------------------------------------------------------
@st.composite
def _random_case(draw) -> tuple[str, dict[str, Any], list[tuple[int, ...]], torch.dtype]:
    name = draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    unit = st.floats(0.0, 0.999)
    if name == "SGD":
        momentum = draw(st.sampled_from([0.0, draw(unit)]))
        nesterov = momentum > 0 and draw(st.booleans())
        kwargs = dict(momentum=momentum, nesterov=nesterov,
                      dampening=0.0 if nesterov else draw(unit))  # fmt: skip
    else:
        kwargs = dict(betas=(draw(unit), draw(unit)), eps=draw(st.floats(1e-10, 1e-2)),
                      amsgrad=draw(st.booleans()))  # fmt: skip
        if name == "Adam":
            kwargs["decoupled_weight_decay"] = draw(st.booleans())
    kwargs.update(lr=draw(st.floats(1e-4, 1.0)), weight_decay=draw(st.sampled_from([0.0, 0.1])),
                  maximize=draw(st.booleans()))  # fmt: skip
    # Sizes around SIMD widths and block edges, empty tensors included.
    sizes = draw(st.lists(st.integers(0, 300), min_size=1, max_size=6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, *LOW_PRECISION]))
    return name, kwargs, [(n,) for n in sizes], dtype


# The fixtures only name the backend and device: sharing them across examples is fine.
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=_random_case())
def test_random_sizes_and_hyperparameters_match_torch(case, backend, device):
    name, kwargs, shapes, dtype = case
    params = make_params(shapes, dtype=dtype, device=device)
    ours_params = clone_params(params)
    ours = FUSED_CLASSES[name](ours_params, backend=backend, **kwargs)
    if dtype in LOW_PRECISION:
        oracle = RoundedFp32Oracle(name, params, dtype, **kwargs)
    else:
        ref_params = clone_params(params)
        ref = TORCH_CLASSES[name](ref_params, foreach=False, **kwargs)
    grads = grad_stream(params)
    for _ in range(5):
        step_grads = next(grads)
        set_grads(ours_params, step_grads)
        ours.step()
        if dtype in LOW_PRECISION:
            oracle.step(step_grads)
        else:
            set_grads(ref_params, step_grads)
            ref.step()
    if dtype in LOW_PRECISION:
        expected = oracle.params_and_states()
    else:
        expected = (ref_params, states_of(ref, ref_params))
    assert_same_tensors(ours_params, states_of(ours, ours_params), *expected,
                        **TIGHT.get(dtype, {}))  # fmt: skip
