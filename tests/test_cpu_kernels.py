"""Op-level tests of the C++ CPU kernels (fused_opt._C) against the pure-PyTorch kernels and
torch.optim's for-loop implementation, on every SIMD variant this CPU can run.

The optimizer-level parity suite (tests/test_parity.py) covers the classes on every backend;
this file checks what only the kernels can get wrong: variants, threads, tails, views, dtypes,
special values, the GradScaler contract and input validation.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

import fused_opt  # noqa: F401  (loads the ops)
from fused_opt import _ops
from fused_opt import _torch_kernels as reference

_C = _ops.native_module("cpp")
pytestmark = pytest.mark.skipif(
    _C is None, reason=f"fused_opt._C is not built ({_ops.LOAD_ERRORS.get('cpp')})"
)

# The accelerator's direct entry points (fused_opt._C_direct), where it loads.
_D = _ops.direct_module()
needs_direct = pytest.mark.skipif(_D is None, reason=f"no accelerator: {_ops.DIRECT_NOTE}")

ISAS = _C.isa_supported() if _C is not None else []
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Sizes around every vector width (1, 4, 8, 16 lanes), a 0-d tensor and an empty one.
SHAPES = [(), (0,), (1,), (3,), (7, 3), (16,), (17,), (33,), (5, 61)]
STEPS = 6


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one SIMD variant, then restore the default."""
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(None)


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- helpers ----------------------------------------------------------------------------------
def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def clone(tensors):
    return [t.clone() for t in tensors]


def adam_state(shapes, dtype, seed=0, amsgrad=True):
    """params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps (different steps per tensor)."""
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, dtype, gen) for s in shapes]
    exp_avgs = [randn(s, dtype, gen, 0.1) for s in shapes]
    exp_avg_sqs = [randn(s, dtype, gen, 0.1).abs() for s in shapes]
    max_sqs = [v + randn(v.shape, dtype, gen, 0.01).abs() for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i % 3)) for i in range(len(shapes))]  # params added later
    return params, exp_avgs, exp_avg_sqs, max_sqs, steps


def grad_stream(shapes, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield [randn(s, dtype, gen) for s in shapes]


def assert_bitwise(actual, expected, what=""):
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(
            a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


def assert_near(actual, expected, dtype, what=""):
    # fp32/fp64: torch's CPU sqrt is not always correctly rounded (ours is), so allow a few ulp;
    # fp16/bf16: one rounding step of the dtype.
    tol = {
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float64: dict(rtol=1e-12, atol=1e-14),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
        torch.float16: dict(rtol=1e-3, atol=1e-5),
    }[dtype]
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(
            a, b, equal_nan=True, **tol, msg=lambda m, i=i: f"{what}[{i}]: {m}"
        )


ADAM_OPTIONS = [
    dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=d, scaled=s)
    for a, m, (wd, d), s in itertools.product(
        (False, True), (False, True), ((0.0, False), (0.1, False), (0.1, True)), (False, True)
    )
]


def adam_kwargs(opts, lr=1e-2):
    return dict(
        lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=opts["weight_decay"],
        amsgrad=opts["amsgrad"], maximize=opts["maximize"],
        decoupled_weight_decay=opts["decoupled_weight_decay"],
    )  # fmt: skip


def run_adam(kernel, state, grads, opts, grad_scale=None, found_inf=None, lr=1e-2):
    params, m, v, vmax, steps = state
    kernel(params, grads, m, v, vmax if opts["amsgrad"] else [], steps,
           grad_scale=grad_scale, found_inf=found_inf, **adam_kwargs(opts, lr))  # fmt: skip


SGD_OPTIONS = [
    dict(momentum=mo, dampening=da, nesterov=ne, weight_decay=wd, maximize=mx, scaled=s)
    for (mo, da, ne), wd, mx, s in itertools.product(
        ((0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.2, False), (0.9, 0.0, True)),
        (0.0, 0.1), (False, True), (False, True),
    )
]  # fmt: skip


def sgd_kwargs(opts, lr=0.1):
    return {
        k: opts[k] for k in ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
    } | {"lr": lr}


# ---- parity with the pure-PyTorch kernels and torch.optim -----------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "opts", ADAM_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_adam_matches_reference_kernels(isa, dtype, opts):
    ours = adam_state(SHAPES, dtype)
    ref = tuple(clone(x) for x in ours)
    scale = torch.tensor(4.0) if opts["scaled"] else None
    grads = grad_stream(SHAPES, dtype)
    for _ in range(STEPS):
        g = next(grads)
        g_scaled = [x * 4 for x in g] if opts["scaled"] else g
        run_adam(torch.ops.fused_opt.adam_, ours, g_scaled, opts, grad_scale=scale)
        run_adam(reference.adam_, ref, g_scaled, opts, grad_scale=scale)
    for name, a, b in zip(
        ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), ours[:4], ref[:4], strict=True
    ):
        assert_near(a, b, dtype, name)
    assert_bitwise(ours[4], ref[4], "steps")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "opts",
    [o for o in ADAM_OPTIONS if not o["scaled"]],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_adam_matches_torch_for_loop(isa, dtype, opts):
    ours = adam_state(SHAPES, dtype)
    ref = tuple(clone(x) for x in ours)
    grads = grad_stream(SHAPES, dtype)
    for _ in range(STEPS):
        g = next(grads)
        run_adam(torch.ops.fused_opt.adam_, ours, g, opts)
        params, m, v, vmax, steps = ref
        torch_adam(params, g, m, v, vmax if opts["amsgrad"] else [], steps, foreach=False,
                   **adam_kwargs(opts))  # fmt: skip
    for name, a, b in zip(
        ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), ours[:4], ref[:4], strict=True
    ):
        assert_near(a, b, dtype, name)
    assert_bitwise(ours[4], ref[4], "steps")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "opts", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_sgd_matches_reference_kernels_and_torch_for_loop(isa, dtype, opts):
    gen = torch.Generator().manual_seed(0)
    params = [randn(s, dtype, gen) for s in SHAPES]
    use_momentum = opts["momentum"] != 0
    ours_p, ref_p, loop_p = params, clone(params), clone(params)
    ours_b = (
        [torch.full_like(p, 7.0) for p in params] if use_momentum else []
    )  # first step overwrites
    ref_b = clone(ours_b)
    loop_b = [None] * len(params)
    scale = torch.tensor(0.5) if opts["scaled"] else None
    grads = grad_stream(SHAPES, dtype)
    for step in range(STEPS):
        g = next(grads)
        g_scaled = [x * 0.5 for x in g] if opts["scaled"] else g
        kwargs = sgd_kwargs(opts) | dict(is_first_step=step == 0, grad_scale=scale)
        torch.ops.fused_opt.sgd_(ours_p, g_scaled, ours_b, **kwargs)
        reference.sgd_(ref_p, g_scaled, ref_b, **kwargs)
        torch_sgd(loop_p, g, loop_b, foreach=False, **sgd_kwargs(opts))
    assert_near(ours_p, ref_p, dtype, "params")
    assert_near(ours_b, ref_b, dtype, "momentum_buffers")
    if dtype in (torch.float32, torch.float64):
        # SGD has no sqrt: the fp32/fp64 trajectory is torch.optim's, bit for bit.
        assert_bitwise(ours_p, loop_p, "params vs torch.optim")
        if use_momentum:
            assert_bitwise(ours_b, loop_b, "momentum_buffers vs torch.optim")


# ---- variants and threads --------------------------------------------------------------------
def adam_run_all(dtype, shapes, opts, steps=3):
    state = adam_state(shapes, dtype, seed=3)
    grads = grad_stream(shapes, dtype, seed=4)
    for _ in range(steps):
        run_adam(torch.ops.fused_opt.adam_, state, next(grads), opts)
    return state


def sgd_run_all(dtype, shapes, opts, steps=3):
    gen = torch.Generator().manual_seed(5)
    params = [randn(s, dtype, gen) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    grads = grad_stream(shapes, dtype, seed=6)
    for step in range(steps):
        torch.ops.fused_opt.sgd_(
            params, next(grads), bufs, **sgd_kwargs(opts), is_first_step=step == 0
        )
    return params, bufs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_variant_computes_the_same_bits(dtype):
    """Every variant does the same operations (FMA everywhere it is used); NaN payloads aside."""
    adam_opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)
    sgd_opts = dict(momentum=0.9, dampening=0.1, nesterov=True, weight_decay=0.1, maximize=True)
    results = {}
    try:
        for name in ISAS:
            _C.set_isa(name)
            results[name] = (
                adam_run_all(dtype, SHAPES, adam_opts),
                sgd_run_all(dtype, SHAPES, sgd_opts),
            )
    finally:
        _C.set_isa(None)
    first, *others = ISAS
    for name in others:
        for a, b in zip(
            results[name][0] + results[name][1], results[first][0] + results[first][1], strict=True
        ):
            assert_bitwise(a, b, f"{name} vs {first}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_give_the_same_bits(isa, threads, dtype):
    # Enough elements for the parallel split (> 32768), boundaries inside odd-sized tensors.
    shapes = [(20011,), (3,), (40007,), (), (12345,)]
    adam_opts = dict(amsgrad=True, maximize=True, weight_decay=0.1, decoupled_weight_decay=True)
    sgd_opts = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        runs.append((adam_run_all(dtype, shapes, adam_opts), sgd_run_all(dtype, shapes, sgd_opts)))
    (a1, s1), (a2, s2) = runs
    for x, y in zip(a1 + s1, a2 + s2, strict=True):
        assert_bitwise(x, y, "1 vs 2 threads")


MANY = 300  # enough tensors for the passes over them to run on every thread (step.cpp)
MANY_SHAPES = [(5,), (), (0,), (3, 4), (17,)] * (MANY // 5)  # steps differ: adam_state


@pytest.mark.parametrize("found_inf", [0.0, 1.0], ids=["step", "found_inf"])
@pytest.mark.parametrize("layout", ["like-params", "one-transposed"])
def test_many_tensors_on_two_threads_give_one_threads_bits(threads, layout, found_inf):
    """Calls over many tensors check, prepare and count steps on every thread; a tensor laid out
    unlike its param sends the preparation back to one thread (through copies). Every tensor,
    step count and version counter must end as on one thread."""
    shapes = list(MANY_SHAPES)
    if layout == "one-transposed":
        shapes[MANY // 2 + 3] = (4, 6)
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    sgd_opts = dict(weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True,
                    maximize=False, is_first_step=False)  # fmt: skip
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        state = adam_state(shapes, torch.float32)
        grads = next(grad_stream(shapes, torch.float32))
        buffers = clone(state[1])
        if layout == "one-transposed":  # state saved before the model moved to channels_last
            i = MANY // 2 + 3
            state[1][i] = state[1][i].t().contiguous().t()
            buffers[i] = buffers[i].t().contiguous().t()
        versions = [t._version for ts in (*state, buffers) for t in ts]
        inf = torch.tensor(found_inf)
        run_adam(torch.ops.fused_opt.adam_, state, grads, opts, found_inf=inf)
        torch.ops.fused_opt.sgd_(state[0], grads, buffers, found_inf=inf, **sgd_opts)
        bumps = [t._version - v for t, v in zip([t for ts in (*state, buffers) for t in ts],
                                                versions, strict=True)]  # fmt: skip
        assert bumps == [0 if found_inf else (2 if k < len(shapes) else 1)
                         for k in range(len(bumps))]  # fmt: skip
        runs.append([t for ts in (*state, buffers) for t in ts])
    assert_bitwise(runs[1], runs[0], "1 vs 2 threads")
    if found_inf:
        assert_bitwise(runs[0][: len(shapes)], adam_state(shapes, torch.float32)[0], "skipped")


# ---- shapes, views, layouts, dtypes ----------------------------------------------------------
def test_unaligned_views_match_contiguous_copies(isa):
    storage = torch.randn(4 * 1000)
    shapes = [(17,), (33,), (1,), (64,)]

    def views(base, offset):  # noqa: E306
        out, at = [], offset
        for s in shapes:
            n = torch.Size(s).numel()
            out.append(base[at : at + n].view(s))
            at += n + 1
        return out

    params = views(storage, 1)  # storage offset 1: not aligned to any vector width
    grads = views(torch.randn(4 * 1000), 3)
    m, v = views(torch.zeros(4 * 1000), 5), views(torch.zeros(4 * 1000), 7)
    steps = [torch.tensor(0.0) for _ in shapes]
    copies = [clone(x) for x in (params, grads, m, v)]
    opts = dict(amsgrad=False, maximize=False, weight_decay=0.0, decoupled_weight_decay=False)
    run_adam(torch.ops.fused_opt.adam_, (params, m, v, [], steps), grads, opts)
    run_adam(
        torch.ops.fused_opt.adam_,
        (copies[0], copies[2], copies[3], [], [torch.tensor(0.0) for _ in shapes]),
        copies[1],
        opts,
    )
    assert_bitwise(params + m + v, copies[0] + copies[2] + copies[3], "view vs copy")
    # Elements between the views were not touched.
    gaps = [
        storage[1 + sum(torch.Size(s).numel() + 1 for s in shapes[: i + 1]) - 1]
        for i in range(len(shapes))
    ]
    assert all(g.isfinite() for g in gaps)


def test_dense_permuted_params_are_handled(isa):
    """channels_last-style params: dense but not contiguous, grads and state laid out alike."""
    base = torch.randn(2, 3, 5, 7)
    p = base.to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    buf = torch.zeros_like(p)
    assert not p.is_contiguous() and buf.stride() == p.stride()
    p_ref, g_ref, buf_ref = p.contiguous(), g.contiguous(), buf.contiguous()
    kwargs = dict(weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
                  maximize=False, is_first_step=True)  # fmt: skip
    torch.ops.fused_opt.sgd_([p], [g], [buf], **kwargs)
    torch.ops.fused_opt.sgd_([p_ref], [g_ref], [buf_ref], **kwargs)
    assert_bitwise([p, buf], [p_ref, buf_ref])


@pytest.mark.parametrize("layout", ["contiguous", "expanded", "strided"])
def test_grads_laid_out_unlike_their_param_are_handled(isa, layout):
    """A grad whose strides differ from its (dense) param's is read through a copy."""
    p = torch.randn(5, 7).t()  # dense, not contiguous
    source = torch.randn(7, 5)
    g = {
        "contiguous": source,
        "expanded": source[:1].expand(7, 5),
        "strided": torch.randn(7, 10)[:, ::2].copy_(source),
    }[layout]
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    p_ref, g_ref = p.clone(), g.clone(memory_format=torch.preserve_format).contiguous()
    g_ref = g_ref.t().contiguous().t()  # the param's layout
    m_ref, v_ref, step_ref = m.clone(), v.clone(), step.clone()
    opts = dict(amsgrad=False, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)
    grad_before = g.clone()
    run_adam(torch.ops.fused_opt.adam_, ([p], [m], [v], [], [step]), [g], opts)
    run_adam(torch.ops.fused_opt.adam_, ([p_ref], [m_ref], [v_ref], [], [step_ref]), [g_ref], opts)
    assert_bitwise([p, m, v, g], [p_ref, m_ref, v_ref, grad_before])


@pytest.mark.parametrize("skipped", [False, True], ids=["step", "found_inf"])
def test_state_laid_out_unlike_its_param_is_updated_through_a_copy(isa, skipped):
    """Contiguous state of a transposed param (as after loading a checkpoint into a model moved
    to channels_last): the same bits as state in the param's layout, and its own layout kept;
    a skipped step writes nothing back."""
    params, m, v, vmax, steps = adam_state([(5, 7)], torch.float32)
    params = [params[0].t().contiguous().t()]  # dense, not contiguous: strides (1, 5)
    grads = next(grad_stream([(5, 7)], torch.float32))
    ours = (params, m, v, vmax, steps)
    ref = (clone(params), *[[t.t().contiguous().t() for t in ts] for ts in (m, v, vmax)],
           clone(steps))  # fmt: skip
    before = [clone(ts) for ts in ours]
    found_inf = torch.tensor(float(skipped))
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)
    run_adam(torch.ops.fused_opt.adam_, ours, grads, opts, found_inf=found_inf)
    run_adam(torch.ops.fused_opt.adam_, ref, grads, opts, found_inf=found_inf)
    for a, b in zip(ours, before if skipped else ref, strict=True):
        assert_bitwise(a, b)
    assert all(t[0].is_contiguous() for t in (m, v, vmax))

    buffer = torch.randn(5, 7)
    p_sgd = torch.randn(7, 5).t()
    p_ref, buffer_ref = p_sgd.clone(), buffer.t().contiguous().t()
    sgd_opts = dict(weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
                    maximize=False, is_first_step=False, found_inf=found_inf)  # fmt: skip
    sgd_before = [p_sgd.clone(), buffer.clone()]
    torch.ops.fused_opt.sgd_([p_sgd], [grads[0]], [buffer], **sgd_opts)
    torch.ops.fused_opt.sgd_([p_ref], [grads[0]], [buffer_ref], **sgd_opts)
    assert_bitwise([p_sgd, buffer], sgd_before if skipped else [p_ref, buffer_ref])


def test_mixed_dtypes_in_one_call(isa):
    shapes = [(17,), (33,), (5,), (40,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
    gen = torch.Generator().manual_seed(0)
    params = [randn(s, d, gen) for s, d in zip(shapes, dtypes, strict=True)]
    grads = [randn(s, d, gen) for s, d in zip(shapes, dtypes, strict=True)]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    opts = dict(amsgrad=False, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    together = (params, m, v, [], steps)
    alone = [
        tuple(clone(x) for x in ([p], [a], [b], [], [s]))
        for p, a, b, s in zip(params, m, v, steps, strict=True)
    ]
    run_adam(torch.ops.fused_opt.adam_, together, grads, opts)
    for state, g in zip(alone, grads, strict=True):
        run_adam(torch.ops.fused_opt.adam_, state, [g], opts)
    for i, state in enumerate(alone):
        assert_bitwise(
            [together[0][i], together[1][i], together[2][i]],
            [state[0][0], state[1][0], state[2][0]],
        )


def test_tensor_lr_overload_equals_float_lr(isa):
    a = adam_state(SHAPES, torch.float32)
    b, c = (tuple(clone(x) for x in a) for _ in range(2))
    g = next(grad_stream(SHAPES, torch.float32))
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    run_adam(torch.ops.fused_opt.adam_, a, g, opts, lr=0.01)
    run_adam(
        torch.ops.fused_opt.adam_.tensor_lr, b, g, opts, lr=torch.tensor(0.01, dtype=torch.float64)
    )
    for x, y in zip(a, b, strict=True):
        assert_bitwise(x, y)
    # tensor_hyper: betas and weight decay as tensors too (fp64: the same values as the floats).
    tensor = functools.partial(torch.tensor, dtype=torch.float64)
    hyper = dict(opts, weight_decay=tensor(0.1))
    torch.ops.fused_opt.adam_.tensor_hyper(
        c[0], g, c[1], c[2], c[3], c[4], grad_scale=None, found_inf=None,
        **dict(adam_kwargs(hyper, tensor(0.01)), beta1=tensor(0.9), beta2=tensor(0.999)),
    )  # fmt: skip
    for x, y in zip(a, c, strict=True):
        assert_bitwise(x, y)
    p1, p2 = clone(a[0]), clone(a[0])
    kwargs = dict(
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
    )
    torch.ops.fused_opt.sgd_(p1, g, [], lr=0.1, **kwargs)
    torch.ops.fused_opt.sgd_.tensor_lr(p2, g, [], lr=torch.tensor(0.1), **kwargs)
    assert_bitwise(p1, p2)


def test_empty_lists_are_a_no_op(isa):
    torch.ops.fused_opt.sgd_([], [], [], weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0,
                             nesterov=False, maximize=False, is_first_step=True)  # fmt: skip
    run_adam(torch.ops.fused_opt.adam_, ([], [], [], [], []), [], ADAM_OPTIONS[0])


# ---- special values --------------------------------------------------------------------------
def special_values(dtype):
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 3.0, -2.0, 1e30]
    t = torch.tensor(values * 3, dtype=torch.float64)[:25]
    return t.to(dtype)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_nan_and_inf_flow_like_torch_optim(isa, amsgrad):
    dtype = torch.float32
    g = special_values(dtype)
    p = torch.linspace(-2, 2, g.numel(), dtype=dtype)
    m = g.roll(3).nan_to_num(0.0, 1.0, -1.0) * 0.1
    v = g.roll(5).abs()  # NaN and Inf in the state too
    vmax = g.roll(7).abs() if amsgrad else None
    ours = ([p], [m], [v], [vmax] if amsgrad else [], [torch.tensor(2.0)])
    ref = tuple(clone(x) for x in ours)
    opts = dict(amsgrad=amsgrad, maximize=False, weight_decay=0.1, decoupled_weight_decay=False)
    run_adam(torch.ops.fused_opt.adam_, ours, [g], opts)
    params, m2, v2, vmax2, steps = ref
    torch_adam(params, [g], m2, v2, vmax2, steps, foreach=False, **adam_kwargs(opts))
    for a, b in zip(ours[:4], ref[:4], strict=True):
        assert_near(a, b, dtype)

    p_sgd, b_sgd = torch.linspace(-2, 2, g.numel()), g.roll(2).clone()
    p_ref, b_ref = p_sgd.clone(), [b_sgd.clone()]
    kwargs = dict(
        weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.1, nesterov=True, maximize=False
    )
    torch.ops.fused_opt.sgd_([p_sgd], [g], [b_sgd], is_first_step=False, **kwargs)
    torch_sgd([p_ref], [g], b_ref, foreach=False, **kwargs)
    assert_bitwise([p_sgd, b_sgd], [p_ref, b_ref[0]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_special_values_round_like_torch(isa, dtype):
    """NaN stays NaN, Inf stays Inf, overflow rounds to Inf, subnormals survive (p - 0*g)."""
    values = special_values(torch.float32)
    extra = torch.tensor([65519.0, 65520.0, 1e-7, 6e-8, 3e-8, -1e-6, 1.00390625, 1.01171875])
    p = torch.cat([values, extra]).to(dtype)
    g = torch.zeros_like(p)
    expected = p.clone()
    kwargs = dict(weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
                  maximize=False, is_first_step=False)  # fmt: skip
    torch.ops.fused_opt.sgd_([p], [g], [], **kwargs)
    assert_bitwise([p.float()], [expected.float()])
    # Computed values are rounded to nearest even like Tensor.to(): p = 0 - lr * g, in fp32.
    gen = torch.Generator().manual_seed(0)
    magnitudes = {
        "wide": torch.logspace(-9, 5, 4000),
        # bf16 subnormals (below 1.2e-38), scattered among normal values so that some vector
        # registers hold both: avx512bf16's conversion instruction would flush them to zero.
        "tiny": torch.logspace(-44, -30, 4000)[torch.randperm(4000, generator=gen)],
    }
    for name, magnitude in magnitudes.items():
        g = (torch.randn(4000, generator=gen) * magnitude).to(dtype)
        for lr in (1 / 3, -3.0):  # -3: overflow to Inf in fp16, subnormals in both
            p = torch.zeros_like(g)
            torch.ops.fused_opt.sgd_([p], [g], [], **(kwargs | {"lr": lr}))
            expected = (g.float() * torch.tensor(-lr, dtype=torch.float32)).to(dtype)
            assert_bitwise([p], [expected], f"{name}, lr={lr}")


def test_bf16_stores_round_every_pattern_like_torch(isa):
    """p + g (lr = -1) is exact in fp32 before the store rounds it to bf16: with p every bf16 bit
    pattern (NaN, Inf, subnormals, both signs) and g small against it, the sums cover every
    kind of lower half, exact ties of both parities among them. The stored bits must be torch's
    round-to-nearest-even, bit for bit, and NaN a NaN (its payload is not compared: torch's
    vectorised conversion, avx2, avx512bf16 and the Arm variants keep it, the baseline and
    avx512 store 0x7FC0 as torch's scalar conversion does)."""
    p = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    for shift in (8, 9, 12, 16, 24):
        # Each g a bf16 value of p's size times 2^-shift (a tie at shift 8 and 9), one in four
        # of random size and sign.
        g = p.float().abs().nan_to_num(0.0, 0.0, 0.0) * 2.0**-shift
        mixed = torch.rand(p.numel(), generator=gen) < 0.25
        g = torch.where(mixed, torch.randn(p.numel(), generator=gen) * g, g).to(torch.bfloat16)
        out = p.clone()
        torch.ops.fused_opt.sgd_([out], [g], [], weight_decay=0.0, momentum=0.0, lr=-1.0,
                                 dampening=0.0, nesterov=False, maximize=False,
                                 is_first_step=False)  # fmt: skip
        expected = (p.float() + g.float()).to(torch.bfloat16)
        got_bits, want_bits = out.view(torch.int16), expected.view(torch.int16)
        nan = expected.isnan()
        wrong = ((got_bits != want_bits) & ~nan | (nan & ~out.isnan())).nonzero().flatten()
        assert wrong.numel() == 0, (
            f"shift {shift}: {wrong.numel()} wrong, e.g. p={p[wrong[:3]].view(torch.int16)} "
            f"g={g[wrong[:3]].view(torch.int16)} got={got_bits[wrong[:3]]} "
            f"want={want_bits[wrong[:3]]}"
        )


# ---- the division by bias_correction2_sqrt ---------------------------------------------------
def bias_corrections2_sqrt(beta2, steps):
    return [(1 - beta2**step) ** 0.5 for step in steps]


DIVISORS = [
    *bias_corrections2_sqrt(0.999, (1, 2, 3, 10, 100, 1000, 10**5)),
    *bias_corrections2_sqrt(0.95, (1, 7)),
    *bias_corrections2_sqrt(0.9999, (1, 5000)),
    # the ends of the reciprocal's range, a power of two, an irrational one, random ones
    *(1.0, 2.0**-20, 0.5, 0.7071067811865476),
    *[0.5 + 0.5 * x for x in torch.rand(8, generator=torch.Generator().manual_seed(3)).tolist()],
    # outside the range: divided
    *(2.0**-21, 2.0**-60, 3.0),
]


def fp32_bits(x):
    return x.view(torch.int32)


def test_the_division_by_bias_correction2_sqrt_is_exact(isa):
    """The 16-bit Adam kernels divide sqrt(v) by bias_correction2_sqrt through its reciprocal and
    two FMA corrections: every fp32 significand, in the binades sqrt(v) can reach, and the
    special values must give exactly the division's bits (scaling x by a power of two scales
    every step of it exactly, so the significands of one binade stand for all of them)."""
    significands = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 2.0**-74.5,
         2.0**-149, 1e-45, 2.0**-126, 2.0**64, 3.4028234e38, -1.5, -2.0**-100],
        dtype=torch.float32,
    )  # fmt: skip
    out = torch.empty_like(significands)
    for c in DIVISORS:
        c32 = torch.tensor(c, dtype=torch.float32)
        for scale in (1.0, 2.0**-75, 2.0**63):
            x = significands * scale
            _ops.divide_by_constant(x, out, c)
            mismatches = (fp32_bits(out) != fp32_bits(x / c32)).sum().item()
            assert mismatches == 0, f"c={c!r}, x in [{scale}, {2 * scale}): {mismatches} differ"
        got = torch.empty_like(specials)
        _ops.divide_by_constant(specials, got, c)
        assert torch.equal(fp32_bits(got), fp32_bits(specials / c32)), f"c={c!r}: {got}"


@pytest.mark.parametrize("streams", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [37, 70_001], ids=["short", "chunked"])
def test_the_bandwidth_pass_reads_every_array_and_writes_all_but_the_second(isa, streams, size):
    """bench/'s floor pass: finite values stay bitwise as they were; a NaN in any array shows
    that it was read, as it spreads to the same element of every array written back."""
    gen = torch.Generator().manual_seed(streams)
    arrays = [torch.rand(size, generator=gen) for _ in range(streams)]
    before = [a.clone() for a in arrays]
    _ops.stream_pass(arrays)
    assert all(torch.equal(a, b) for a, b in zip(arrays, before, strict=True))
    for source in range(streams):
        at = (source * 7919) % size  # in the vector loop or the tail
        arrays[source][at] = float("nan")
        _ops.stream_pass(arrays)
        for s, a in enumerate(arrays):
            assert a[at].isnan().item() == (s != 1 or s == source), (source, s)
            a[at] = before[s][at]
        assert all(torch.equal(a, b) for a, b in zip(arrays, before, strict=True))


@pytest.mark.parametrize(
    "arrays",
    [
        [],
        [torch.zeros(8) for _ in range(6)],
        [torch.zeros(8), torch.zeros(9)],
        [torch.zeros(8, dtype=torch.float64)],
        [torch.zeros(16)[::2]],
    ],
    ids=["none", "six", "sizes", "fp64", "strided"],
)
def test_the_bandwidth_pass_refuses_what_it_cannot_stream(arrays):
    with pytest.raises(ValueError, match="1 to 5 contiguous fp32 CPU tensors of one size"):
        _ops.stream_pass(arrays)
    with pytest.raises(TypeError, match="arrays must be a list of tensors"):
        _ops.stream_pass(torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("beta2", [0.999, 1 - 2.0**-45], ids=["reciprocal", "divided"])
def test_16_bit_adam_is_the_fp32_step_rounded_once(isa, dtype, beta2):
    """bf16 and fp16 params and states step in fp32 and round once: bitwise the fp32 kernel's
    results on the same values, rounded (beta2 near 1: bias_correction2_sqrt out of the
    reciprocal's range at the first step)."""
    shapes = [(4099,), (64, 33), (5,)]
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    low = adam_state(shapes, dtype)
    gen = torch.Generator().manual_seed(5)
    # sqrt(v) over many binades, as mixed-scale grads leave it
    low[2][:] = [(v.float() * torch.logspace(-30, 10, v.numel()).view(v.shape)).to(dtype)
                 for v in low[2]]  # fmt: skip
    g = [randn(s, dtype, gen) * torch.logspace(-8, 4, math.prod(s)).view(s).to(dtype)
         for s in shapes]  # fmt: skip
    wide = tuple([x.float() for x in part] for part in low[:4]) + (clone(low[4]),)
    kwargs = adam_kwargs(opts) | dict(beta2=beta2)
    for state, grads in ((low, g), (wide, [x.float() for x in g])):
        params, m, v, vmax, steps = state
        torch.ops.fused_opt.adam_(params, grads, m, v, vmax, steps, **kwargs)
    names = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    for name, a, b in zip(names, low[:4], wide[:4], strict=True):
        assert_bitwise(a, [x.to(dtype) for x in b], name)
    assert_bitwise(low[4], wide[4], "steps")


# ---- GradScaler contract ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_found_inf_changes_nothing(isa, dtype):
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    state = adam_state(SHAPES, dtype)
    before = tuple(clone(x) for x in state)
    g = next(grad_stream(SHAPES, dtype))
    run_adam(
        torch.ops.fused_opt.adam_,
        state,
        g,
        opts,
        grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(1.0),
    )
    for a, b in zip(state, before, strict=True):
        assert_bitwise(a, b, "adam_ with found_inf")

    # Also on the very first SGD step, when the momentum buffers are fresh.
    params = clone(state[0])
    p_before = clone(params)
    bufs = [torch.full_like(p, 3.0) for p in params]
    b_before = clone(bufs)
    torch.ops.fused_opt.sgd_(params, g, bufs, weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0,
                             nesterov=True, maximize=False, is_first_step=True,
                             grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0))  # fmt: skip
    assert_bitwise(params + bufs, p_before + b_before, "sgd_ with found_inf")


def test_found_inf_zero_steps_normally(isa):
    opts = dict(amsgrad=False, maximize=False, weight_decay=0.0, decoupled_weight_decay=False)
    a = adam_state(SHAPES, torch.float32)
    b = tuple(clone(x) for x in a)
    g = next(grad_stream(SHAPES, torch.float32))
    run_adam(torch.ops.fused_opt.adam_, a, g, opts, found_inf=torch.tensor(0.0))
    run_adam(torch.ops.fused_opt.adam_, b, g, opts)
    for x, y in zip(a, b, strict=True):
        assert_bitwise(x, y)


@pytest.mark.parametrize("maximize", [False, True])
def test_grad_scale_equals_unscale_then_step(isa, maximize):
    dtype = torch.float32
    scale = torch.tensor(1024.0)
    g = next(grad_stream(SHAPES, dtype))
    scaled = [x * 3000.0 for x in g]  # not exactly representable after division: a real unscale
    unscaled = [x / scale for x in scaled]
    opts = dict(amsgrad=True, maximize=maximize, weight_decay=0.1, decoupled_weight_decay=False)
    a = adam_state(SHAPES, dtype)
    b = tuple(clone(x) for x in a)
    run_adam(torch.ops.fused_opt.adam_, a, scaled, opts, grad_scale=scale)
    run_adam(torch.ops.fused_opt.adam_, b, unscaled, opts)
    for x, y in zip(a, b, strict=True):
        assert_bitwise(x, y, "adam_")
    p1, p2 = clone(a[0]), clone(a[0])
    b1, b2 = [torch.ones_like(p) for p in p1], [torch.ones_like(p) for p in p1]
    kwargs = dict(weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.1, nesterov=True,
                  maximize=maximize, is_first_step=False)  # fmt: skip
    torch.ops.fused_opt.sgd_(p1, scaled, b1, grad_scale=scale, **kwargs)
    torch.ops.fused_opt.sgd_(p2, unscaled, b2, **kwargs)
    assert_bitwise(p1 + b1, p2 + b2, "sgd_")


# ---- validation ------------------------------------------------------------------------------
def adam_call(state, grads, **overrides):
    params, m, v, vmax, steps = state
    kwargs = adam_kwargs(ADAM_OPTIONS[0]) | overrides
    torch.ops.fused_opt.adam_(params, grads, m, v, vmax, steps, **kwargs)


BAD_ADAM_INPUTS = {
    "grad count": (lambda s, g: (s, g[:-1]), "expected 4 grads, got 3"),
    "exp_avg count": (lambda s, g: ((s[0], s[1][:-1], *s[2:]), g), "expected 4 exp_avgs, got 3"),
    "missing steps": (lambda s, g: ((*s[:4], []), g), "every param needs exp_avg"),
    "shape": (lambda s, g: (s, g[:-1] + [torch.zeros(6)]), "grads[3] has shape"),
    "dtype": (lambda s, g: (s, g[:-1] + [g[-1].double()]), "grads[3] has dtype"),
    "state dtype": (
        lambda s, g: ((s[0], s[1], s[2][:-1] + [s[2][-1].half()], *s[3:]), g),
        "exp_avg_sqs[3] has dtype",
    ),
    "step shape": (
        lambda s, g: ((*s[:4], s[4][:-1] + [torch.tensor([1.0, 2.0])]), g),
        "steps[3] must be a one-element float32",
    ),
    "int param": (
        lambda s, g: (([*s[0][:-1], torch.zeros(5, dtype=torch.int32)], *s[1:]), g),
        "params[3] has dtype Int, not a float type",
    ),
    "sparse grad": (lambda s, g: (s, g[:-1] + [g[-1].to_sparse()]), "sparse"),
    "strided param": (
        lambda s, g: (([*s[0][:-1], torch.zeros(10)[::2]], *s[1:]), g),
        "do not cover its memory densely",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ADAM_INPUTS))
def test_bad_input_raises_before_anything_changes(case):
    make, message = BAD_ADAM_INPUTS[case]
    shapes = [(5,), (7,), (3,), (5,)]
    state = adam_state(shapes, torch.float32, amsgrad=False)
    grads = next(grad_stream(shapes, torch.float32))
    bad_state, bad_grads = make(state, grads)
    before = [clone(x) for x in bad_state]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        adam_call(bad_state, bad_grads)
    for a, b in zip(bad_state, before, strict=True):
        assert_bitwise(a, b, f"{case}: modified before raising")


@pytest.mark.parametrize(
    "case", ["shape", "dtype", "state dtype", "step shape", "int param", "sparse grad"]
)
def test_bad_input_among_many_tensors_raises_before_anything_changes(threads, case):
    torch.set_num_threads(2)
    make, message = BAD_ADAM_INPUTS[case]
    shapes = [(5,)] * MANY
    state = adam_state(shapes, torch.float32, amsgrad=False)
    bad_state, bad_grads = make(state, next(grad_stream(shapes, torch.float32)))
    before = [clone(x) for x in bad_state]
    with pytest.raises(RuntimeError, match=re.escape(message.replace("[3]", f"[{MANY - 1}]"))):
        adam_call(bad_state, bad_grads)
    for a, b in zip(bad_state, before, strict=True):
        assert_bitwise(a, b, f"{case}: modified before raising")
    params = [torch.randn(5) for _ in range(MANY)]
    grads = [torch.randn(5) for _ in range(MANY - 1)] + [torch.randn(4)]
    before = clone(params)
    with pytest.raises(RuntimeError, match=re.escape(f"grads[{MANY - 1}] has shape")):
        torch.ops.fused_opt.sgd_(params, grads, [], weight_decay=0.0, momentum=0.0, lr=0.1,
                                 dampening=0.0, nesterov=False, maximize=False,
                                 is_first_step=False)  # fmt: skip
    assert_bitwise(params, before)


def test_sgd_bad_input_raises_before_anything_changes():
    params = [torch.randn(5), torch.randn(3)]
    before = clone(params)
    bufs = [torch.zeros(5)]
    with pytest.raises(RuntimeError, match="expected 2 momentum_buffers, got 1"):
        torch.ops.fused_opt.sgd_(params, [torch.randn(5), torch.randn(3)], bufs, weight_decay=0.0,
                                 momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
                                 maximize=False, is_first_step=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="momentum != 0 needs one momentum buffer per param"):
        torch.ops.fused_opt.sgd_(params, [torch.randn(5), torch.randn(3)], [], weight_decay=0.0,
                                 momentum=0.9, lr=0.1, dampening=0.0, nesterov=False,
                                 maximize=False, is_first_step=False)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        torch.ops.fused_opt.sgd_(params, [torch.randn(5), torch.randn(4)], [], weight_decay=0.0,
                                 momentum=0.0, lr=0.1, dampening=0.0, nesterov=False,
                                 maximize=False, is_first_step=False)  # fmt: skip
    assert_bitwise(params, before)


# ---- dispatcher and variant selection --------------------------------------------------------
def test_opcheck():
    gen = torch.Generator().manual_seed(0)

    def tensors(n=3, size=9):  # noqa: E306
        return [torch.randn(size, generator=gen) for _ in range(n)]

    sgd_kwargs_ = dict(weight_decay=0.1, momentum=0.9, lr=0.1, dampening=0.0, nesterov=True,
                       maximize=False, is_first_step=False)  # fmt: skip
    adam_kwargs_ = adam_kwargs(ADAM_OPTIONS[-1])
    steps = lambda: [torch.tensor(1.0) for _ in range(3)]  # noqa: E731
    cases = [
        (torch.ops.fused_opt.sgd_.default, (tensors(), tensors(), tensors()), sgd_kwargs_),
        (torch.ops.fused_opt.sgd_.tensor_lr, (tensors(), tensors(), tensors()),
         sgd_kwargs_ | {"lr": torch.tensor(0.1)}),
        (torch.ops.fused_opt.adam_.default,
         (tensors(), tensors(), tensors(), [t.abs() for t in tensors()],
          [t.abs() + 1 for t in tensors()], steps()),
         adam_kwargs_ | {"grad_scale": torch.tensor(2.0), "found_inf": torch.tensor(0.0)}),
        (torch.ops.fused_opt.adam_.tensor_lr,
         (tensors(), tensors(), tensors(), [t.abs() for t in tensors()], [], steps()),
         adam_kwargs(ADAM_OPTIONS[0]) | {"lr": torch.tensor(0.01)}),
    ]  # fmt: skip
    for op, args, kwargs in cases:
        torch.library.opcheck(op, args, kwargs)


def test_variant_report():
    compiled, supported = _C.isa_compiled(), _C.isa_supported()
    assert compiled[0] == "baseline" and set(supported) <= set(compiled)
    assert _C.isa_active() == supported[-1]  # the best one by default
    with pytest.warns(RuntimeWarning, match="using"):
        assert _C.set_isa("sse9") == supported[-1]
    _C.set_isa(None)


@pytest.mark.skipif(
    "FUSED_OPT_TEST_EXPECT_ISAS" not in os.environ,
    reason="FUSED_OPT_TEST_EXPECT_ISAS (set by tools/aarch64.sh per emulated CPU) is not set",
)
def test_detection_finds_the_variants_this_cpu_has():
    """Run time detection (HWCAP, the SVE vector length) against what the emulated CPU has."""
    expected = os.environ["FUSED_OPT_TEST_EXPECT_ISAS"].split(",")
    assert _C.isa_supported() == expected
    assert _C.isa_active() == expected[-1]


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSED_OPT_CPU_ISA=value)
    code = "import fused_opt, fused_opt._C as C; print(C.isa_active())"
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_environment_variable_forces_a_lower_variant():
    result = _isa_in_subprocess("baseline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["baseline"]


def test_environment_variable_asking_too_much_falls_back_with_a_warning():
    result = _isa_in_subprocess("avx1024")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [_C.isa_supported()[-1]]
    assert "RuntimeWarning" in result.stderr and "avx1024" in result.stderr


def test_found_inf_warning_free_and_repeatable():
    """The kernels never warn; a call twice with found_inf set is still a no-op."""
    state = adam_state([(5,)], torch.float32)
    before = [clone(x) for x in state]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            run_adam(torch.ops.fused_opt.adam_, state, [torch.randn(5)], ADAM_OPTIONS[0],
                     found_inf=torch.tensor(float("inf")))  # fmt: skip
    for a, b in zip(state, before, strict=True):
        assert_bitwise(a, b)


# ---- the direct entry points of fused_opt._C_direct---------------------------------------------
def adam_positional(state, grads, opts, grad_scale=None, found_inf=None, lr=1e-2):
    params, m, v, vmax, steps = state
    k = adam_kwargs(opts, lr)
    return (params, grads, m, v, vmax if opts["amsgrad"] else [], steps, k["lr"], k["beta1"],
            k["beta2"], k["weight_decay"], k["eps"], k["amsgrad"], k["maximize"],
            k["decoupled_weight_decay"], grad_scale, found_inf)  # fmt: skip


@pytest.mark.parametrize("opts", ADAM_OPTIONS[::5], ids=lambda o: "-".join(map(str, o.values())))
@needs_direct
def test_direct_adam_equals_the_op(isa, opts):
    a = adam_state(SHAPES, torch.bfloat16)
    b = tuple(clone(x) for x in a)
    scale = torch.tensor(2.0) if opts["scaled"] else None
    grads = grad_stream(SHAPES, torch.bfloat16)
    for _ in range(3):
        g = next(grads)
        run_adam(torch.ops.fused_opt.adam_, a, g, opts, grad_scale=scale)
        _D.adam_(*adam_positional(b, g, opts, grad_scale=scale))
    for x, y in zip(a, b, strict=True):
        assert_bitwise(x, y)
    # The tensor lr overload, and found_inf.
    _D.adam_(*adam_positional(b, g, opts, lr=torch.tensor(1e-2)))
    run_adam(torch.ops.fused_opt.adam_, a, g, opts)
    before = [clone(x) for x in b]
    _D.adam_(*adam_positional(b, g, opts, found_inf=torch.tensor(1.0)))
    for x, y, z in zip(a, b, before, strict=True):
        assert_bitwise(x, y)
        assert_bitwise(y, z)


@pytest.mark.parametrize("opts", SGD_OPTIONS[::3], ids=lambda o: "-".join(map(str, o.values())))
@needs_direct
def test_direct_sgd_equals_the_op(isa, opts):
    gen = torch.Generator().manual_seed(0)
    p1 = [randn(s, torch.float32, gen) for s in SHAPES]
    p2 = clone(p1)
    use_momentum = opts["momentum"] != 0
    b1 = [torch.zeros_like(p) for p in p1] if use_momentum else []
    b2 = clone(b1)
    scale = torch.tensor(0.5) if opts["scaled"] else None
    k = sgd_kwargs(opts)
    grads = grad_stream(SHAPES, torch.float32)
    for step in range(3):
        g = next(grads)
        torch.ops.fused_opt.sgd_(p1, g, b1, **k, is_first_step=step == 0, grad_scale=scale)
        _D.sgd_(p2, g, b2, k["weight_decay"], k["momentum"], k["lr"], k["dampening"],
                k["nesterov"], k["maximize"], step == 0, scale, None)  # fmt: skip
    assert_bitwise(p1 + b1, p2 + b2)


@needs_direct
def test_direct_entry_points_check_their_input():
    params, grads = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(4)]
    before = clone(params)
    with pytest.raises(RuntimeError, match=re.escape("grads[1] has shape [4]")):
        _D.sgd_(params, grads, [], 0.0, 0.0, 0.1, 0.0, False, False, False, None, None)
    with pytest.raises(TypeError, match="grads must be a list of tensors"):
        _D.sgd_(params, 5, [], 0.0, 0.0, 0.1, 0.0, False, False, False, None, None)
    # None: the params' own grads, which they do not have.
    assert _D.sgd_(params, None, [], 0.0, 0.0, 0.1, 0.0, False, False, False, None, None) is False
    with pytest.raises(TypeError, match=re.escape("params[1] is not a tensor")):
        _D.sgd_([params[0], 1.0], grads, [], 0.0, 0.0, 0.1, 0.0, False, False, False, None, None)
    with pytest.raises(TypeError, match="takes 12 positional arguments"):
        _D.sgd_(params, grads, [])
    assert_bitwise(params, before)


def _model_after_backward():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()  # grads made in C++, no Python objects yet
    return list(model.parameters())


@needs_direct
def test_direct_entry_points_read_the_grads_from_the_params():
    """grads=None: each param's .grad, read in C++; the same bits as passing the grads."""
    params = _model_after_backward()
    ref = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    ref_zeros = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps, ref_steps = [torch.tensor(0.0) for _ in params], [torch.tensor(0.0) for _ in params]
    adam = (1e-2, 0.9, 0.999, 0.1, 1e-8, False, False, True, None, None)
    with torch.no_grad():
        assert _D.adam_(params, None, *zeros, [], steps, *adam) is True
        assert _D.adam_(ref, grads, *ref_zeros, [], ref_steps, *adam) is None
        assert_bitwise([*params, *zeros[0], *zeros[1], *steps],
                       [*ref, *ref_zeros[0], *ref_zeros[1], *ref_steps])  # fmt: skip
        sgd = (0.0, 0.9, 0.1, 0.0, True, False, True, None, None)
        assert _D.sgd_(params, None, zeros[0], *sgd) is True
        assert _D.sgd_(ref, grads, ref_zeros[0], *sgd) is None
        assert_bitwise([*params, *zeros[0]], [*ref, *ref_zeros[0]])


@pytest.mark.parametrize("case", ["a grad is None", "a param is a subclass"])
@needs_direct
def test_reading_grads_from_params_declines_without_changing_anything(case):
    class Tagged(torch.Tensor):  # may define .grad through __torch_function__
        pass

    params = _model_after_backward()
    if case == "a grad is None":
        params[2].grad = None
    else:
        params[2] = params[2].detach().as_subclass(Tagged).requires_grad_()
        params[2].grad = torch.ones_like(params[2])
    buffers = [torch.ones_like(p) for p in params]
    before = [clone(params), clone(buffers)]
    with torch.no_grad():
        done = _D.sgd_(params, None, buffers, 0.0, 0.9, 0.1, 0.0, False, False, False, None, None)
    assert done is False
    assert_bitwise([*params, *buffers], [*before[0], *before[1]])


@needs_direct
def test_grads_of_reads_each_params_grad():
    class Tagged(torch.Tensor):  # a subclass other than Parameter: read through the attribute
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()  # grads created in C++ by the autograd engine
    params = list(model.parameters())
    params[1].grad = None
    tagged = torch.ones(2).as_subclass(Tagged).requires_grad_()
    tagged.grad = torch.full((2,), 3.0)
    params.append(tagged)
    grads, missing = _D.grads_of(params)
    assert len(grads) == len(params) and grads[1] is None and missing == [1]
    for i in (0, 2, 3):
        assert grads[i] is params[i].grad
    assert type(grads[4]) is type(tagged.grad) and torch.equal(grads[4], tagged.grad)
    with pytest.raises(TypeError, match="params must be a list"):
        _D.grads_of(tuple(params))


def test_a_failed_call_keeps_no_reference_to_its_tensors():
    """The dispatcher kernels reuse thread-local storage for the lists: a check that fails must
    not leave the caller's tensors alive there."""
    import gc
    import weakref

    p = torch.zeros(4)
    alive = weakref.ref(p)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[5\]"):
        torch.ops.fused_opt.sgd_([p], [torch.zeros(5)], [], weight_decay=0.0, momentum=0.0,
                                 lr=0.1, dampening=0.0, nesterov=False, maximize=False,
                                 is_first_step=False)  # fmt: skip
    del p
    gc.collect()
    assert alive() is None


def test_in_place_updates_bump_version_counters():
    """Autograd must see the in-place updates (saved-tensor checks), as with torch.optim."""
    state = adam_state([(5,), (3,)], torch.float32)
    g = [torch.randn(5), torch.randn(3)]
    opts = dict(amsgrad=True, maximize=False, weight_decay=0.0, decoupled_weight_decay=False)
    versions = lambda: [t._version for tensors in state for t in tensors]  # noqa: E731
    v0 = versions()
    run_adam(torch.ops.fused_opt.adam_, state, g, opts)
    v1 = versions()
    assert all(b == a + 1 for a, b in zip(v0, v1, strict=True))
    if _D is not None:  # the accelerator counts them itself
        _D.adam_(*adam_positional(state, g, opts))
        assert all(b == a + 1 for a, b in zip(v1, versions(), strict=True))
    v2 = versions()
    run_adam(torch.ops.fused_opt.adam_, state, g, opts, found_inf=torch.tensor(1.0))
    assert versions() == v2  # a skipped step changes nothing, not even the versions


def test_float64_step_counts_work_like_float32(isa):
    """torch.optim keeps `step` in float64 when that is the default dtype."""
    opts = dict(amsgrad=False, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)
    a = adam_state(SHAPES, torch.float32)
    b = tuple(clone(x) for x in a[:4]) + ([s.double() for s in a[4]],)
    grads = grad_stream(SHAPES, torch.float32)
    for _ in range(3):
        g = next(grads)
        run_adam(torch.ops.fused_opt.adam_, a, g, opts)
        run_adam(torch.ops.fused_opt.adam_, b, g, opts)
    for x, y in zip(a[:4], b[:4], strict=True):
        assert_bitwise(x, y)
    assert [s.item() for s in a[4]] == [s.item() for s in b[4]]
    assert all(s.dtype == torch.float64 for s in b[4])
