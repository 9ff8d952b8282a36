"""The custom ops themselves: schemas, fake kernels and every registered kernel, via opcheck."""

import pytest
import torch

import fused_opt  # noqa: F401  (registers the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _tensors(n, dtype, device, shapes=((7,), (3, 5), ())):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(device, dtype) for s in shapes]


def sgd_args(dtype, device, momentum, tensor_lr):
    params, grads = _tensors(1, dtype, device), _tensors(2, dtype, device)
    bufs = _tensors(3, dtype, device) if momentum else []
    lr = torch.tensor(0.1, device=device) if tensor_lr else 0.1
    kwargs = dict(weight_decay=0.01, momentum=momentum, lr=lr, dampening=0.0, nesterov=False,
                  maximize=False, is_first_step=False)  # fmt: skip
    return (params, grads, bufs), kwargs


def adam_args(dtype, device, amsgrad, overload):
    params, grads = _tensors(1, dtype, device), _tensors(2, dtype, device)
    exp_avgs = _tensors(3, dtype, device)
    exp_avg_sqs = [t.abs() for t in _tensors(4, dtype, device)]
    max_sqs = [t.abs() for t in _tensors(5, dtype, device)] if amsgrad else []
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.01)
    as_tensors = {"default": (), "tensor_lr": ("lr",), "tensor_hyper": tuple(hyper)}[overload]
    hyper.update({name: torch.tensor(hyper[name], device=device) for name in as_tensors})
    # Device betas need device steps (the CUDA kernels' capturable path).
    steps = [torch.tensor(3.0, device=device if as_tensors else "cpu") for _ in params]
    kwargs = dict(**hyper, eps=1e-8, amsgrad=amsgrad, maximize=True, decoupled_weight_decay=True)
    return (params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps), kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck_sgd(device, dtype, tensor_lr, momentum):
    args, kwargs = sgd_args(dtype, device, momentum, tensor_lr)
    op = torch.ops.fused_opt.sgd_.tensor_lr if tensor_lr else torch.ops.fused_opt.sgd_.default
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overload", ["default", "tensor_lr", "tensor_hyper"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_adam(device, dtype, overload, amsgrad):
    args, kwargs = adam_args(dtype, device, amsgrad, overload)
    torch.library.opcheck(getattr(torch.ops.fused_opt.adam_, overload), args, kwargs)


def test_found_inf_makes_the_op_a_no_op():
    args, kwargs = adam_args(torch.float32, "cpu", True, "default")
    before = [[t.clone() for t in ts] for ts in args]
    torch.ops.fused_opt.adam_(*args, **kwargs, found_inf=torch.tensor(1.0))
    for ts, olds in zip(args, before, strict=True):
        for t, old in zip(ts, olds, strict=True):
            assert torch.equal(t, old)


def test_ops_are_opaque_to_torch_compile():
    """The fake kernels let a compiled graph hold the op as one node, with no graph break."""
    (params, grads, bufs), kwargs = sgd_args(torch.float32, "cpu", 0.9, False)
    expected = [p.clone() for p in params]
    torch.ops.fused_opt.sgd_(expected, grads, [b.clone() for b in bufs], **kwargs)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(params, grads, bufs):
        torch.ops.fused_opt.sgd_(params, grads, bufs, **kwargs)

    step(params, grads, bufs)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=0, atol=0)
