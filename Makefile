# The README's commands. `make test` and `make bench` work on a fresh machine: they create a
# virtual environment (unless one is active), install torch (pinned: an unpinned torch pulls GBs
# of CUDA packages) and the project, then run.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
ARGS ?=

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Pinned: each release of a formatter moves lines around (the pyproject `dev` extra matches).
LINTERS := "ruff==0.17.*" "clang-format==23.1.*"

.PHONY: help install test bench lint format wheel cuda-check gpu-check test-aarch64 clean

help:
	@echo "make test    build and run the test suite (also: make cuda-check)"
	@echo "make bench   compare fused_opt with torch.optim on this machine (ARGS=--quick|--full)"
	@echo "make lint    ruff + clang-format checks;  make format  fixes them"
	@echo "make wheel   build a binary wheel (see docs/INSTALL.md)"
	@echo "make gpu-check  the one-shot check of a GPU machine (tools/gpu_check.sh)"
	@echo "make test-aarch64  the aarch64 wheel, built and tested under qemu (tools/aarch64.sh)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The build needs torch's headers: install torch first, then build against it. The editable
# install rebuilds every kernel (45 s on 2 cores), so it runs again only when what it builds from
# has changed since, as a stamp in the environment records; Python changes need no reinstall.
STAMP := $(VENV)/.fused_opt-installed-torch$(TORCH_VERSION)
BUILD_INPUTS := setup.py pyproject.toml MANIFEST.in $(shell find csrc -type f)

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS) | $(PY)
	$(PIP) "torch==$(TORCH_VERSION)" setuptools wheel ninja
	$(PIP) --no-build-isolation -e ".[test,bench,dev,examples]"
	touch $@

test: install cuda-check
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m bench $(ARGS)

# Every CUDA source must compile for the archs of a default build, also without a GPU.
cuda-check:
	bash tools/check_cuda.sh

# The one-shot check of a GPU machine (tools/gpu_check.sh): no venv, nothing fetched; the CUDA
# wheel in build/cuda-check/wheelhouse/ (tools/check_cuda_build.sh) installed into a scratch
# folder when there, else a build for that GPU. The project's venv where one exists (practice on
# a CPU machine), else python3 (the GPU image's).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash tools/gpu_check.sh

wheel: install
	PYTHON=$(PY) bash tools/build_wheel.sh

# The aarch64 wheel (wheelhouse/), cross-built here and tested under qemu with PyPI's aarch64
# torch: Debian with apt as root; about 30 minutes on 2 cores (tools/aarch64.sh).
test-aarch64: install
	PYTHON=$(PY) bash tools/aarch64.sh

lint: | $(PY)
	$(PIP) $(LINTERS)
	$(VENV)/bin/ruff check fused_opt tests bench examples tools setup.py
	$(VENV)/bin/ruff format --check fused_opt tests bench examples tools setup.py
	find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs -r $(VENV)/bin/clang-format --dry-run -Werror

format: | $(PY)
	$(PIP) $(LINTERS)
	$(VENV)/bin/ruff check --fix fused_opt tests bench examples tools setup.py
	$(VENV)/bin/ruff format fused_opt tests bench examples tools setup.py
	find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs -r $(VENV)/bin/clang-format -i

clean:
	rm -rf build dist *.egg-info fused_opt/*.so fused_opt/_build_info.json
	rm -f $(VENV)/.fused_opt-installed-*
