"""fused_opt's benchmarks: the comparison command (`python -m bench`, `make bench`) and the
pytest-benchmark suite (`pytest bench --benchmark-only`), over the same workloads
(bench/workloads.py) and implementations (bench/implementations.py)."""
