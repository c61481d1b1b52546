# make test   set up (venv, torch, build) and run every test: pytest, ctest, nvcc compile check
# make bench  set up and run the default benchmark
# make gpu-check  on a machine with one NVIDIA GPU (an H200) and no network, < 9 min, with
#             its python3 (no venv): CUDA build, GPU tests, GPU benchmark into
#             bench/results/<gpu name>/ (.ci/gpu_check.sh; GPU_CHECK_DRY_RUN=1 PYTHON=...
#             rehearses the same steps on the CPU with tiny sizes)
#
# Uses the active virtual environment if there is one, else creates .venv here.
SHELL := /bin/bash
TORCH_VERSION := 2.13.0
VENV ?= .venv
ifdef VIRTUAL_ENV
  ENV_DIR := $(VIRTUAL_ENV)
else
  ENV_DIR := $(CURDIR)/$(VENV)
endif
PYTHON := $(ENV_DIR)/bin/python
DEPS_STAMP := $(ENV_DIR)/.fused_optim-deps
BENCH_STAMP := $(ENV_DIR)/.fused_optim-bench-deps
EDITABLE_STAMP := $(ENV_DIR)/.fused_optim-editable
CMAKE_BUILD := build/cmake

.PHONY: test bench build deps pytest ctest cuda-check gpu-check clean

test: build
	$(MAKE) --no-print-directory ctest
	$(PYTHON) -m pytest -q tests

# The default benchmark: table on the terminal, JSON + PNG under $(BENCH_OUT)/<device>/
# (results/ is not tracked; results committed under bench/results/ come from
# `make bench BENCH_OUT=bench/results`).
BENCH_OUT ?= results
bench: build $(BENCH_STAMP)
	$(PYTHON) -m fused_optim.bench --out $(BENCH_OUT)

$(PYTHON):
	python3 -m venv $(ENV_DIR)

# torch only if it is missing, and then pinned; the rest from requirements-dev.txt.
$(DEPS_STAMP): requirements-dev.txt | $(PYTHON)
	$(PYTHON) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	touch $@

deps: $(DEPS_STAMP)

# The benchmark's own dependencies (rich, matplotlib, DeepSpeed as a peer), without
# build isolation: DeepSpeed builds from source and imports torch while doing so.
$(BENCH_STAMP): bench/requirements.txt | $(DEPS_STAMP)
	$(PYTHON) -m pip install -q --no-build-isolation -r bench/requirements.txt
	touch $@

# fused_optim/_C is built in place with a persistent ./build (ninja: rebuilds are
# incremental); an editable install, made once, maps triton_kernels/ and bench/ to
# fused_optim.triton_kernels / fused_optim.bench without compiling anything.
$(EDITABLE_STAMP): $(DEPS_STAMP) setup.py pyproject.toml
	FUSED_OPTIM_NO_EXTENSION=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(EDITABLE_STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} $(PYTHON) setup.py -q build_ext --inplace

pytest: build
	$(PYTHON) -m pytest -q tests

# C++ unit tests of the torch-free CPU engine (csrc/cpu), built by CMakeLists.txt.
ctest: deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(PYTHON) >/dev/null
	cmake --build $(CMAKE_BUILD) --target fused_optim_cpp_tests
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# Compiles every csrc/cuda/*.cu with nvcc (no GPU needed).
cuda-check: deps
	bash .ci/compile_cuda.sh $(PYTHON)

# Build, test and benchmark on a GPU machine; see .ci/gpu_check.sh. Uses that machine's
# python3 (or $PYTHON), not the venv above: nothing is installed there.
gpu-check:
	bash .ci/gpu_check.sh

clean:
	rm -rf build $(CMAKE_BUILD) fused_optim/_C*.so *.egg-info
