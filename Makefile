# The few verbs people type. `make test` creates .venv on a fresh machine,
# installs what the suite needs and runs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
STAMP := $(VENV)/.installed
# torchsort builds a CUDA extension whenever nvcc is on PATH; build it CPU-only.
NO_NVCC_PATH := $(shell nv=$$(command -v nvcc 2>/dev/null); if [ -n "$$nv" ]; then echo "$$PATH" | tr ':' '\n' | grep -vxF "$$(dirname $$nv)" | paste -sd: -; else echo "$$PATH"; fi)

.PHONY: test test-fast lint format install bench clean demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	PATH="$(NO_NVCC_PATH)" $(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation "torchsort>=0.1.9"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -x -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/plot_kernels.py
	$(PY) benchmarks/summarize_kernels.py --readme README.md

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

demo: $(STAMP)
	$(PY) -m otloss.demo
