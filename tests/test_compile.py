"""torch.compile and CUDA graphs: a whole training step with fused_opt inside one graph.

The fused ops have fake kernels, so dynamo records each bucket's update as one opaque node.
A step function (forward, backward, ``opt.step()``) must compile with ``fullgraph=True`` (any
graph break raises), must not recompile when a scheduler changes a tensor lr, and must give the
same parameters as eager mode. Most checks use the ``aot_eager`` backend (fast, and exactly the
eager kernels, so results are bitwise equal); one test runs inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fused_opt

OPTIMIZERS = {
    "SGD": (fused_opt.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "Adam": (fused_opt.Adam, {"weight_decay": 1e-4}),
    "AdamW": (fused_opt.AdamW, {"amsgrad": True}),
}
# Steps before the graphs settle: the first creates the state, the second rebuilds the cached
# plan around it, the third finds the plan cached. Later steps must reuse the third graph.
WARMUP_STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # loss.backward() inside a compiled function needs trace_autograd_ops (torch >= 2.13).
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(device)


def batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=gen).to(device), torch.randn(4, 2, generator=gen).to(device)


def run(name: str, backend: str, device: torch.device, steps: int, compile_backend=None):
    """Train ``steps`` steps with a tensor lr halved every 2 steps; eager when no compile_backend.

    Returns the params and the lr seen at each step.
    """
    model = make_model(device)
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(model.parameters(), lr=torch.tensor(0.01), backend=backend, **kwargs)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    # The scheduler wraps opt.step in a function from torch/optim/lr_scheduler.py, a file dynamo
    # skips; dont_skip_tracing lets it trace through that wrapper into our step.
    @torch._dynamo.dont_skip_tracing
    def train_step(x, y):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    if compile_backend is not None:
        train_step = torch.compile(train_step, fullgraph=True, backend=compile_backend)
    lrs = []
    with warnings.catch_warnings():
        # Under compile, the wrapper's `opt._opt_called = True` (set through a weakref) is lost,
        # so the scheduler wrongly warns that it stepped first. The lrs are checked below.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for step in range(steps):
            lrs.append(opt.param_groups[0]["lr"].item())
            train_step(*batch(step, device))
            opt.zero_grad()  # torch disables dynamo in zero_grad: it stays outside the graph
            schedule.step()
    return [p.detach().clone() for p in model.parameters()], lrs


class GraphRecorder(CompileCounterWithBackend):
    """Counts compiled frames (as its parent does) and keeps the FX graphs dynamo produced."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return super().__call__(gm, example_inputs)


def fused_op_calls(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if "fused_opt" in str(n.target)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_compiles_fullgraph_and_matches_eager(name, backend, device):
    recorder = GraphRecorder("aot_eager")
    steps = WARMUP_STEPS + 5
    compiled_params, compiled_lrs = run(name, backend, device, steps, compile_backend=recorder)
    eager_params, eager_lrs = run(name, backend, device, steps)

    assert compiled_lrs == eager_lrs and len(set(eager_lrs)) > 2, "the lr did not change"
    # fullgraph=True raised on any graph break; no new frame once warm (the lr is a tensor).
    assert recorder.frame_count == WARMUP_STEPS
    # The update is one opaque op per (device, dtype) bucket: here one. (backend="torch" next
    # to a loaded compiled backend calls the Python kernel itself: dynamo traces its foreach ops.)
    op = "adam_" if name != "SGD" else "sgd_"
    compiled_here = {"cpu": "cpp", "cuda": "cuda"}[device.type] in fused_opt.available_backends()
    opaque = not (backend == "torch" and compiled_here)
    calls = [call.split(".")[1] for call in fused_op_calls(recorder.graphs[-1])]
    assert calls == ([op] if opaque else [])
    # Bitwise, but for the traced Python kernel: eager it runs torch's fused Adam, which dynamo
    # does not trace, and compiled its foreach ops; both follow torch.optim within rounding.
    tolerance = dict(rtol=1e-5, atol=1e-6) if not opaque and op == "adam_" else dict(rtol=0, atol=0)
    for ours, theirs in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(ours, theirs, **tolerance)


def test_inductor_step_matches_eager(backend, device):
    steps = WARMUP_STEPS + 2
    compiled_params, _ = run("AdamW", backend, device, steps, compile_backend="inductor")
    eager_params, _ = run("AdamW", backend, device, steps)
    # Inductor fuses the forward and backward differently: equal up to float rounding.
    for ours, theirs in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_cuda_graph_replays_a_whole_step(name, backend, device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    if backend == "torch":
        pytest.skip("the pure-PyTorch kernels read the step counts on the host: not capturable")
    cls, kwargs = OPTIMIZERS[name]

    def make():
        model = make_model(device)
        return model, cls(model.parameters(), lr=0.01, capturable=True, backend=backend, **kwargs)

    def train_step(model, opt, x, y):
        F.mse_loss(model(x), y).backward()
        opt.step()

    # Eager reference.
    model, opt = make()
    for step in range(6):
        opt.zero_grad(set_to_none=False)
        train_step(model, opt, *batch(step, device))
    expected = [p.detach().clone() for p in model.parameters()]

    # Warm up on a side stream (creates the state and the grads), then capture one step.
    model, opt = make()
    static_x, static_y = batch(0, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            static_x.copy_(batch(step, device)[0])
            static_y.copy_(batch(step, device)[1])
            opt.zero_grad(set_to_none=False)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    # Capturing did not run the step: replay the remaining steps.
    for step in range(3, 6):
        static_x.copy_(batch(step, device)[0])
        static_y.copy_(batch(step, device)[1])
        for p in model.parameters():
            p.grad.zero_()
        graph.replay()
    torch.cuda.synchronize()
    for ours, theirs in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(ours, theirs)
