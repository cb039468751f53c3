# The few verbs people type. `make test` creates .venv on a fresh machine, installs the locked
# environment and runs the suite.
#
# requirements/lock.txt is the one place where versions are chosen (Python 3.11, x86-64 Linux,
# CPU torch, every extra). `make lock` regenerates it from pyproject.toml and requirements/lock.in.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := requirements/lock.txt
PIP_TOOLS_VERSION := 7.6.2
EXTRAS := triton soft pot trl lightning test bench docs demo lint
# torch goes in first, at the locked version, so that nothing pulls a CUDA build of a newer release.
TORCH_PIN = $(shell grep -E '^torch==' $(LOCK) | cut -d' ' -f1)
# torchsort builds a CUDA extension whenever nvcc is on PATH; build it CPU-only.
NO_NVCC_PATH := $(shell nv=$$(command -v nvcc 2>/dev/null); if [ -n "$$nv" ]; then echo "$$PATH" | tr ':' '\n' | grep -vxF "$$(dirname $$nv)" | paste -sd: -; else echo "$$PATH"; fi)
PIP_QUIET ?= --quiet
export NO_MKDOCS_2_WARNING := 1

.PHONY: test test-fast test-latest lint format install install-demo lock bench bench-all gpu-check docs docs-build clean demo

# $(1): stamp file, $(2): extras to install from the lock.
define install_locked
	@echo "== installing $(2) from $(LOCK) into $(VENV) (first run only)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_QUIET) "$(TORCH_PIN)"
	$(PIP) install $(PIP_QUIET) -c $(LOCK) setuptools wheel
	PATH="$(NO_NVCC_PATH)" $(PIP) install $(PIP_QUIET) -c $(LOCK) --no-build-isolation -e ".[$(2)]"
	$(PY) requirements/check_lock.py $(LOCK)
	touch $(1)
endef

$(VENV)/.installed: $(LOCK) pyproject.toml Makefile requirements/check_lock.py
	$(call install_locked,$@,dev)

$(VENV)/.installed-demo: $(LOCK) pyproject.toml Makefile requirements/check_lock.py
	$(call install_locked,$@,demo)

install: $(VENV)/.installed

install-demo: $(VENV)/.installed-demo

test: $(VENV)/.installed
	$(PY) -m pytest
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -x -q

# Not in CI: the newest release of every dependency (torch stays at the locked CPU build), in a
# throwaway environment, so that upstream drift is found on purpose.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install $(PIP_QUIET) "$(TORCH_PIN)" setuptools wheel
	echo "$(TORCH_PIN)" > .venv-latest/constraints.txt
	PATH="$(NO_NVCC_PATH)" .venv-latest/bin/pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager \
		-c .venv-latest/constraints.txt --no-build-isolation -e ".[dev]"
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -p no:cacheprovider

# Regenerate the lock. Versions are chosen here and nowhere else.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install $(PIP_QUIET) "$$(grep -E '^torch==' requirements/lock.in)" "pip-tools==$(PIP_TOOLS_VERSION)"
	PATH="$(NO_NVCC_PATH)" .venv-lock/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --annotation-style line $(foreach e,$(EXTRAS),--extra $(e)) \
		--pip-args "--no-build-isolation" -o $(LOCK) pyproject.toml requirements/lock.in
	rm -rf .venv-lock

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# BENCH_FLAGS: on a shared CPU, one thread per method and longer runs give steadier medians.
BENCH_FLAGS ?= --threads 1 --min-run-time 0.3
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_kernels.py $(BENCH_FLAGS)
	$(PY) benchmarks/plot_kernels.py
	$(PY) benchmarks/summarize_kernels.py --readme README.md

# The other benchmarks: soft sort against torchsort, sliced OT against POT, PLOT's step cost, dominance.
bench-all: bench
	$(PY) benchmarks/bench_soft_sort.py && $(PY) benchmarks/bench_soft_sort.py --plot
	$(PY) benchmarks/bench_sliced.py
	$(PY) benchmarks/bench_plot.py
	$(PY) benchmarks/bench_dominance.py

# On a machine with a CUDA device: the CUDA- and Triton-marked tests, then the kernel benchmark (OUT=dir).
OUT ?= outputs/gpu_check
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-build: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo install-demo: PIP_QUIET := --progress-bar on
demo: $(VENV)/.installed-demo
	$(PY) -m examples.imdb

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
