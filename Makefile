# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
BTM     := $(VENV)/bin/btm
PYTEST  := $(VENV)/bin/pytest
STAMP   := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-fast gpu-wheels gpu-check-dry clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q torch==2.13.0            # CPU wheel from local disk (pinned: unpinned pulls CUDA)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation -e .   # builds csrc/ against the installed torch
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BTM) demo --output $(DEMO_OUT)

test: $(STAMP)
	bash tools/run_tests.sh $(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow and not slurm" tests

# Wheels for the lent GPU machine (tools/gpu_wheels.txt; cp312 manylinux) into .whl/, and the
# GPU check's dry run (every step that needs no GPU). On the GPU: bash tools/gpu_check.sh
WHEEL_DIR ?= .whl
GPU_WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-wheels:
	mkdir -p $(WHEEL_DIR)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d $(WHEEL_DIR) $$(grep -v '^#' tools/gpu_wheels.txt)
	du -sh $(WHEEL_DIR)

gpu-check-dry: $(STAMP)
	PYTHON=$(VENV)/bin/python bash tools/gpu_check.sh --cpu-dry-run

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
