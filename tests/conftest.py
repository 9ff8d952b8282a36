"""Fixtures shared by the test suite: which backend runs, on which device.

Every test that takes ``backend`` (or ``device``) runs once per (backend, device) pair: the
compiled C++ kernels and the pure-PyTorch kernels on the CPU, the CUDA kernels and the
pure-PyTorch kernels on a GPU. Pairs that cannot run here are skipped with the reason, so the
same suite covers each backend as soon as it builds.
"""

from __future__ import annotations

import pytest
import torch

import fused_opt
from fused_opt import _ops

# (backend, device type): every way a step can run.
_TARGETS = [("cpp", "cpu"), ("torch", "cpu"), ("cuda", "cuda"), ("torch", "cuda")]


def _why_not_runnable(backend: str, device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend != "torch" and backend not in fused_opt.available_backends():
        return (
            f"the {backend} backend is not available ({_ops.LOAD_ERRORS.get(backend, 'not built')})"
        )
    return None


def _target_param(backend: str, device_type: str) -> pytest.param:
    reason = _why_not_runnable(backend, device_type)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    if device_type == "cuda":
        marks.append(pytest.mark.cuda)
    return pytest.param((backend, device_type), id=f"{backend}-{device_type}", marks=marks)


@pytest.fixture(params=[_target_param(*target) for target in _TARGETS])
def backend_and_device(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture
def backend(backend_and_device: tuple[str, str]) -> str:
    """The ``backend=`` argument under test."""
    return backend_and_device[0]


@pytest.fixture
def device(backend_and_device: tuple[str, str]) -> torch.device:
    """The device the params of the test live on."""
    return torch.device(backend_and_device[1])


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def single_threaded():
    """Run the test with one intra-op thread, then restore the count.

    The parity tests run thousands of small torch ops (torch.optim's for-loop reference); on a
    busy machine each multi-threaded one waits for idle cores and gets orders of magnitude slower.
    Threaded kernels are checked by tests that keep the default thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
