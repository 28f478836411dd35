# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
BTM     := $(VENV)/bin/btm
PYTEST  := $(VENV)/bin/pytest
STAMP   := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-fast clean

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

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)
