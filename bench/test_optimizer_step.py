"""pytest-benchmark suite: one optimizer step, per (workload, dtype, optimizer) x implementation.

The cases are the default plan of `python -m bench`; groups are (workload, dtype, optimizer), so
`--benchmark-group-by=group` compares implementations side by side. extra_info carries the
elements, tensors, bytes a step must move and the achieved GB/s, and ``wrong_results`` for an
implementation whose results differ from torch.optim's for-loop (correctness.py). Examples:

    pytest bench --benchmark-only
    pytest bench --benchmark-only -k "many-small and adamw" --benchmark-save=before
    pytest bench --benchmark-only -k "many-small and adamw" --benchmark-compare
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from .cli import make_plan
from .correctness import wrong_results
from .implementations import Implementation, discover
from .measure import synchronizer
from .workloads import DTYPES, OPTIMIZERS, WORKLOADS, bytes_per_element, make_tensors

IMPLEMENTATIONS, NOTES = discover()
# Fewer rounds where one step moves gigabytes.
ROUNDS = {"gpt2-small": 5}
DEFAULT_ROUNDS = 20


def _cases() -> list:
    params = []
    for case in make_plan("default").cases:
        for opt in case.optimizers:
            for impl in IMPLEMENTATIONS:
                case_id = f"{case.workload}-{case.dtype}-{opt}-{impl.name.replace(' ', '-')}"
                params.append(pytest.param(case.workload, case.dtype, opt, impl, id=case_id))
    return params


@functools.lru_cache(maxsize=1)  # cases run workload by workload: one tensor set alive at a time
def _tensors(workload: str, dtype: str, device: torch.device) -> list[Tensor]:
    params, grads = make_tensors(WORKLOADS[workload], DTYPES[dtype], device)
    for p, g in zip(params, grads, strict=True):
        p.requires_grad_(True)
        p.grad = g
    return params


@functools.cache
def _wrong(optimizer: str, dtype: str, device: torch.device) -> dict[str, str]:
    return wrong_results(IMPLEMENTATIONS, OPTIMIZERS[optimizer], DTYPES[dtype], device)


@pytest.mark.parametrize(("workload", "dtype", "optimizer", "impl"), _cases())
def test_step(
    benchmark,  # noqa: ANN001 (pytest-benchmark's fixture)
    bench_device: torch.device,
    workload: str,
    dtype: str,
    optimizer: str,
    impl: Implementation,
) -> None:
    spec = OPTIMIZERS[optimizer]
    reason = impl.unsupported(spec, DTYPES[dtype], bench_device)
    if reason:
        pytest.skip(f"{impl.name}: {reason}")
    params = _tensors(workload, dtype, bench_device)
    opt = impl.build(spec, params)
    sync = synchronizer(bench_device)

    def step() -> None:
        opt.step()
        sync()  # CUDA: the step is timed until its kernels finish

    nbytes = bytes_per_element(spec, DTYPES[dtype]) * WORKLOADS[workload].elements
    benchmark.group = f"{workload} {dtype} {optimizer}"
    benchmark.extra_info.update(
        elements=WORKLOADS[workload].elements,
        tensors=WORKLOADS[workload].tensors,
        bytes_per_step=nbytes,
        implementation=impl.name,
        device=bench_device.type,
        threads=torch.get_num_threads(),
    )
    if why := _wrong(optimizer, dtype, bench_device).get(impl.name):
        benchmark.extra_info["wrong_results"] = why  # as `python -m bench` marks it with '!'

    # Warm-up rounds allocate the state and settle the caches before anything is timed.
    benchmark.pedantic(
        step, rounds=ROUNDS.get(workload, DEFAULT_ROUNDS), warmup_rounds=3, iterations=1
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gb_per_s"] = nbytes / benchmark.stats.stats.median / 1e9
