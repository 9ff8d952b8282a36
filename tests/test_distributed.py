"""torch.distributed on 2 CPU ranks: DDP, FSDP2 (fully_shard), distributed checkpoint, ZeRO.

Each scenario trains the same model twice under the same wrapper, once with fused_opt and once
with torch.optim, and compares the parameters. The two ranks are separate processes started the
way torchrun starts them (one per rank, RANK / WORLD_SIZE in the environment), rendezvous through
a file (no network port), talk over gloo, and run every scenario in one launch to keep the suite
fast; each rank reports each scenario's outcome to a JSON file that the tests below read.

Run one rank by hand: ``RANK=0 WORLD_SIZE=2 python tests/test_distributed.py INIT_FILE OUT_DIR``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _reference import FusedOpCounter
from torch import nn

import fused_opt

WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 300
SCENARIOS = ["ddp", "fsdp2", "fsdp2_checkpoint", "zero"]
CPU_BACKENDS = [b for b in fused_opt.available_backends() if b != "cuda"]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch is built without torch.distributed / gloo",
)


# ---- what each rank runs ----------------------------------------------------------------------
def make_model() -> nn.Module:
    # The last layer's bias has 1 element: with 2 ranks, FSDP2 leaves one rank an empty shard.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Different data on each rank, as with a DistributedSampler.
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def assert_same_params(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def scenario_ddp(backend: str) -> None:
    """DistributedDataParallel: same params as torch.optim, for SGD (Nesterov) and AdamW."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for fused_cls, torch_cls, kwargs in [
        (fused_opt.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
        (fused_opt.AdamW, torch.optim.AdamW, {"lr": 1e-2}),
    ]:
        results = []
        for cls, extra in ((fused_cls, {"backend": backend}), (torch_cls, {})):
            model = DDP(make_model())
            train(model, cls(model.parameters(), **kwargs, **extra), range(4))
            results.append(full_params(model))
        assert_same_params(*results)


def scenario_fsdp2(backend: str) -> None:
    """fully_shard: same params as torch.optim; state as DTensors placed like their params."""
    from torch.distributed.tensor import DTensor

    # backend="torch" next to the loaded C++ kernels calls the Python kernel without the op.
    reaches_dispatcher = not (backend == "torch" and "cpp" in fused_opt.available_backends())
    for fused_cls, torch_cls, kwargs in [
        (fused_opt.AdamW, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
        (fused_opt.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ]:
        results = []
        for cls, extra in ((fused_cls, {"backend": backend}), (torch_cls, {})):
            model = sharded(make_model())
            opt = cls(model.parameters(), **kwargs, **extra)
            train(model, opt, range(3))
            with FusedOpCounter() as counter:
                train(model, opt, range(3, 4))
            results.append(full_params(model))
            if cls is fused_cls and reaches_dispatcher:
                # One kernel call for all the local shards of the group (a cached plan).
                assert counter.calls == 1, f"{counter.calls} fused op calls in one step"
            if cls is fused_cls:
                # The 1-element bias: one rank holds an empty shard and steps it all the same.
                empty = torch.tensor([int(model[-1].bias.to_local().numel() == 0)])
            for p in model.parameters():
                assert isinstance(p, DTensor)
                for key, value in opt.state[p].items():
                    if key != "step":  # a plain scalar, as in torch.optim
                        assert isinstance(value, DTensor), f"{key} is not a DTensor"
                        assert value.placements == p.placements and value.shape == p.shape
        assert_same_params(*results)
    dist.all_reduce(empty)
    assert empty.item() == 1, "no rank had an empty local shard"


def scenario_fsdp2_checkpoint(backend: str) -> None:
    """Save at step 3 through torch.distributed.checkpoint, load into a fresh model, go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    def fresh():
        model = sharded(make_model())
        return model, fused_opt.AdamW(model.parameters(), lr=1e-2, backend=backend)

    model, opt = fresh()
    train(model, opt, range(3))
    model_state, optim_state = get_state_dict(model, opt)
    path = [tempfile.mkdtemp(prefix="fused_opt_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path[0])
    train(model, opt, range(3, 6))
    uninterrupted = full_params(model)

    model, opt = fresh()
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path[0])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p in model.parameters():
        assert isinstance(opt.state[p]["exp_avg"], DTensor)
        assert opt.state[p]["step"].item() == 3
    train(model, opt, range(3, 6))
    for a, b in zip(full_params(model), uninterrupted, strict=True):
        assert torch.equal(a, b), "resuming from the checkpoint changed the trajectory"


def scenario_zero(backend: str) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=fused_opt.AdamW): same params as torch.optim's."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = []
    for cls, extra in ((fused_opt.AdamW, {"backend": backend}), (torch.optim.AdamW, {})):
        model = DDP(make_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2, **extra)
        train(model, opt, range(4))
        results.append(full_params(model))
    assert_same_params(*results)


def run_rank(init_file: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank,
        world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    outcomes = {}
    for backend in CPU_BACKENDS:
        for name in SCENARIOS:
            try:
                globals()[f"scenario_{name}"](backend)
                outcomes[f"{name}[{backend}]"] = "ok"
            except Exception:
                outcomes[f"{name}[{backend}]"] = traceback.format_exc()
            dist.barrier()  # keep the ranks in step even after a failure
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


# ---- the tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict[str, str]]:
    """Launch the 2 ranks once; each scenario's outcome on each rank."""
    work = tmp_path_factory.mktemp("distributed")
    repo_root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ, "WORLD_SIZE": str(WORLD_SIZE), "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(work / "rendezvous"), str(work)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for rank in range(WORLD_SIZE)
    ]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    logs = []
    for proc in ranks:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {LAUNCH_TIMEOUT_S} s")
    results = []
    for rank, log in enumerate(logs):
        report = work / f"rank{rank}.json"
        if not report.is_file():
            pytest.fail(f"rank {rank} crashed:\n{log.decode(errors='replace')[-4000:]}")
        results.append(json.loads(report.read_text()))
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_passes_on_both_ranks(scenario, backend, device, outcomes):
    """See scenario_<name>: same params as torch.optim (DDP, FSDP2, ZeRO), exact DCP resume."""
    if device.type != "cpu":
        pytest.skip("the distributed tests run on CPU ranks over gloo")
    for rank, outcome in enumerate(outcomes):
        result = outcome[f"{scenario}[{backend}]"]
        assert result == "ok", f"rank {rank}:\n{result}"


if __name__ == "__main__":
    run_rank(*sys.argv[1:3])
