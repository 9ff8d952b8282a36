"""Mixed precision: fused_opt under torch.amp.autocast and GradScaler, against torch.optim.

fused_opt's optimizers set ``_step_supports_amp_scaling``, so GradScaler does not unscale the
grads itself: it hands the optimizer ``grad_scale`` and ``found_inf`` and the kernels divide in
registers and skip the whole step on overflow. These tests check that contract from the user's
side: same trajectory as torch.optim under the same scaler (bf16 autocast on the CPU, fp16 on
CUDA), skipped steps that change nothing, and no double unscaling after ``unscale_``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_opt

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}

# name: (fused class, torch.optim class, hyper-parameters); each exercises its state paths.
OPTIMIZERS = {
    "SGD": (fused_opt.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                             "weight_decay": 1e-4}),
    "Adam": (fused_opt.Adam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-4}),
    "AdamW": (fused_opt.AdamW, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
}  # fmt: skip


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(device)


def make_optimizer(name: str, model: nn.Module, backend: str | None) -> torch.optim.Optimizer:
    fused_cls, torch_cls, kwargs = OPTIMIZERS[name]
    if backend is None:
        return torch_cls(model.parameters(), **kwargs)
    return fused_cls(model.parameters(), backend=backend, **kwargs)


def batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=gen).to(device), torch.randn(8, 4, generator=gen).to(device)


def backward_scaled(model: nn.Module, scaler: torch.amp.GradScaler, step: int,
                    device: torch.device, overflow: bool = False) -> None:  # fmt: skip
    x, y = batch(step, device)
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPE[device.type]):
        loss = F.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if overflow:  # what an fp16 overflow in the backward pass leaves behind
        model[0].weight.grad[0, 0] = float("inf")


def train(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          device: torch.device, steps: range, overflow_at: tuple[int, ...] = (),
          clip: float | None = None) -> None:  # fmt: skip
    for step in steps:
        backward_scaled(model, scaler, step, device, overflow=step in overflow_at)
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    # Empty entries are what looking a param up in the state defaultdict leaves: no state.
    state = {i: s for i, s in opt.state_dict()["state"].items() if s}
    return params, copy.deepcopy(state)


def assert_bitwise_equal(before: tuple[list, dict], after: tuple[list, dict]) -> None:
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b), "a skipped step changed a param"
    assert before[1].keys() == after[1].keys()
    for index, state in before[1].items():
        assert state.keys() == after[1][index].keys()
        for key, value in state.items():
            assert torch.equal(value, after[1][index][key]), f"a skipped step changed {key}"


def test_scaler_hands_the_scale_to_the_optimizer(backend, device):
    # GradScaler's non-fused path would unscale p.grad in place; the fused path reads it as is.
    model = make_model(device)
    opt = make_optimizer("AdamW", model, backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    backward_scaled(model, scaler, 0, device)
    scaled_grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(model.parameters(), scaled_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("steps_before", [0, 3], ids=["first-step", "after-3-steps"])
def test_overflow_step_changes_nothing(name, steps_before, backend, device):
    model = make_model(device)
    opt = make_optimizer(name, model, backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    train(model, opt, scaler, device, range(steps_before))
    before = snapshot(model, opt)
    scale = scaler.get_scale()

    train(model, opt, scaler, device, range(steps_before, steps_before + 1),
          overflow_at=(steps_before,))  # fmt: skip

    assert scaler.get_scale() == scale / 2, "the scaler did not see the overflow"
    if steps_before or name == "SGD":
        assert_bitwise_equal(before, snapshot(model, opt))
    else:
        # Adam creates its state before the kernel learns of the overflow (as torch's fused
        # Adam does): zeros and step 0 then, which the next real step treats as a first step.
        assert_bitwise_equal(before[:1] + ({},), snapshot(model, opt)[:1] + ({},))
        for state in opt.state_dict()["state"].values():
            assert all(not t.any() for t in state.values()), "a skipped first step left state"
    # The next step runs: the skipped one left nothing that breaks it.
    train(model, opt, scaler, device, range(steps_before + 1, steps_before + 2))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_matches_torch_optim_under_the_same_scaler(name, backend, device):
    # Overflows at steps 0 and 3: a skipped first step, a skipped later step, scale changes.
    results = []
    for impl in (backend, None):
        model = make_model(device)
        opt = make_optimizer(name, model, impl)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**14, growth_interval=3)
        train(model, opt, scaler, device, range(8), overflow_at=(0, 3))
        results.append((list(model.parameters()), scaler.get_scale()))
    (fused_params, fused_scale), (torch_params, torch_scale) = results
    assert fused_scale == torch_scale
    for ours, theirs in zip(fused_params, torch_params, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unscale_then_clip_does_not_unscale_twice(name, backend, device):
    # A large scale makes a second division by it visible at once.
    results = []
    for impl in (backend, None):
        model = make_model(device)
        opt = make_optimizer(name, model, impl)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
        train(model, opt, scaler, device, range(5), overflow_at=(2,), clip=0.5)
        results.append(list(model.parameters()))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_unscaled_grads_are_used_as_they_are(backend, device):
    model = make_model(device)
    opt = make_optimizer("SGD", model, backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    backward_scaled(model, scaler, 0, device)
    scaler.unscale_(opt)
    unscaled = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    lr, momentum = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
    decay = opt.param_groups[0]["weight_decay"]
    for p, p0, g in zip(model.parameters(), before, unscaled, strict=True):
        # First Nesterov step: buf = g' = g + wd * p, update = g' + momentum * buf.
        g = g + decay * p0
        torch.testing.assert_close(p, p0 - lr * (g + momentum * g))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.cuda
def test_capturable_adam_under_grad_scaler_matches_torch_optim(name):
    # Device step counts and found_inf read on the device, overflows included.
    if not torch.cuda.is_available() or "cuda" not in fused_opt.available_backends():
        pytest.skip("needs a CUDA device and the CUDA kernels")
    device = torch.device("cuda")
    fused_cls, torch_cls, kwargs = OPTIMIZERS[name]
    results = []
    for cls, extra in ((fused_cls, {"backend": "cuda"}), (torch_cls, {})):
        model = make_model(device)
        opt = cls(model.parameters(), capturable=True, **kwargs, **extra)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14, growth_interval=3)
        train(model, opt, scaler, device, range(8), overflow_at=(0, 3))
        results.append((list(model.parameters()), scaler.get_scale(), opt))
    (ours, our_scale, our_opt), (theirs, their_scale, their_opt) = results
    assert our_scale == their_scale
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    for p, q in zip(ours, theirs, strict=True):
        assert our_opt.state[p]["step"].item() == their_opt.state[q]["step"].item()
