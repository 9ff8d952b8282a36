"""Options of the pytest-benchmark suite (`pytest bench --benchmark-only`)."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_opt bench")
    group.addoption(
        "--bench-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of the benchmarked tensors (auto: cuda when available, else cpu)",
    )


@pytest.fixture(scope="session")
def bench_device(request: pytest.FixtureRequest) -> torch.device:
    choice = request.config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device is available")
    return torch.device(choice)
