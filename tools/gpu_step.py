"""A small step of every CUDA op, dtype and variant: what tools/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

Ragged sizes (a vector body and a scalar tail), a tensor that starts one element past an
aligned address (the unaligned path), several tensors of each dtype in one call (the tables),
float and device-tensor lr (and, for capturable Adam, device betas and weight decay: the
.tensor_hyper overload), host and device step counts, grad_scale and found_inf. Each call's
result is compared with the torch backend's (pure PyTorch, same fp32 math), so a sanitizer run
that passes also stepped right. Exits 1 on a mismatch; prints one line per case.
"""

from __future__ import annotations

import itertools
import sys

import torch

import fused_opt  # noqa: F401  (registers the ops; the CUDA kernels when built)
from fused_opt import _ops, _torch_kernels

SHAPES = [(1,), (7,), (1023,), (4097,), (33, 65)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# `python tools/gpu_step.py cpu` runs the same cases on the CPU kernels (to try the script).
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-14),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def tensors(dtype: torch.dtype, gen: torch.Generator, positive: bool = False) -> list:
    out = []
    for shape in SHAPES:
        base = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        out.append(base.to(DEVICE, dtype))
    # One element past the start of an allocation: misaligned for the vector loads.
    unaligned = torch.empty(2050, device=DEVICE, dtype=dtype)[1:]
    unaligned.copy_(
        torch.rand(2049, generator=gen) if positive else torch.randn(2049, generator=gen)
    )
    return out + [unaligned]


def cases():
    for dtype, lr_kind in itertools.product(DTYPES, ("float", "device")):
        for nesterov, scaled in ((False, False), (True, True)):
            yield "sgd_", dtype, lr_kind, {"nesterov": nesterov, "scaled": scaled}
        for amsgrad, capturable, scaled in ((False, False, False), (True, True, True),
                                            (True, False, True)):  # fmt: skip
            variant = {"amsgrad": amsgrad, "capturable": capturable, "scaled": scaled}
            yield "adam_", dtype, lr_kind, variant
            if capturable and lr_kind == "device":  # device betas need device steps
                yield "adam_", dtype, "hyper", variant


def run(op: str, dtype: torch.dtype, lr_kind: str, variant: dict) -> float:
    gen = torch.Generator().manual_seed(0)
    params = tensors(dtype, gen)
    grads = tensors(dtype, gen)
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01, device=DEVICE)
    scaling = {}
    if variant["scaled"]:
        scaling = {"grad_scale": torch.tensor(4.0, device=DEVICE),
                   "found_inf": torch.tensor(0.0, device=DEVICE)}  # fmt: skip
    if op == "sgd_":
        state = [tensors(dtype, gen)]
        hyper = dict(weight_decay=0.01, momentum=0.9, lr=lr, dampening=0.1,
                     nesterov=variant["nesterov"], maximize=False, is_first_step=False)  # fmt: skip
    else:
        step_device = DEVICE if variant["capturable"] else "cpu"
        state = [tensors(dtype, gen), tensors(dtype, gen, positive=True),
                 tensors(dtype, gen, positive=True) if variant["amsgrad"] else [],
                 [torch.tensor(2.0, device=step_device) for _ in params]]  # fmt: skip
        betas = dict(beta1=0.9, beta2=0.999, weight_decay=0.01)
        if lr_kind == "hyper":
            betas = {name: torch.tensor(v, device=DEVICE) for name, v in betas.items()}
        hyper = dict(lr=lr, **betas, eps=1e-8, amsgrad=variant["amsgrad"], maximize=False,
                     decoupled_weight_decay=True)  # fmt: skip
    ours = [params, grads, *state]
    reference = [[t.clone() for t in ts] for ts in ours]
    getattr(torch.ops.fused_opt, op)(*ours, **hyper, **scaling)
    getattr(_torch_kernels, op)(*reference, **hyper, **scaling)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    worst = 0.0
    rtol, atol = TOLERANCE[dtype]
    for a_list, b_list in zip(ours, reference, strict=True):
        for a, b in zip(a_list, b_list, strict=True):
            a, b = a.double().cpu(), b.double().cpu()
            if not torch.allclose(a, b, rtol=rtol, atol=atol):
                worst = max(worst, ((a - b).abs() / (atol + rtol * b.abs())).max().item())
    return worst


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_step: no CUDA device")
        return 2
    # Without the CUDA kernels the ops run the torch backend, which this would compare with
    # itself: refuse.
    if DEVICE == "cuda" and not (
        _ops.cuda_ready() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "fused_opt::adam_", "CUDA")
    ):  # fmt: skip
        print(f"gpu_step: the CUDA kernels are not loaded ({_ops.LOAD_ERRORS.get('cuda')})")
        return 3
    failed = 0
    for op, dtype, lr_kind, variant in cases():
        worst = run(op, dtype, lr_kind, variant)
        failed += worst > 0
        flags = ",".join(k for k, v in variant.items() if v) or "-"
        status = "ok" if worst == 0 else f"MISMATCH ({worst:.1f}x the tolerance)"
        print(f"gpu_step: {op:6s} {str(dtype):15s} lr={lr_kind:6s} {flags:28s} {status}")
    print(f"gpu_step: {failed} mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
