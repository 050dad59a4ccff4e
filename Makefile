# The README's two commands are `make study` and `make test`.
# Everything happens inside a virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; override for a GPU box, e.g. `make TORCH_SPEC="torch" study`.
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= quick
# parallel runs of the study (GPUs dealt out in turn, several runs per GPU when JOBS exceeds them;
# the CPU cores are shared out among the jobs)
JOBS ?= 1
# the phantom cohort and data directory of the study profile, as mmdm/study/profiles.py defines them
# (read when a recipe needs them, after `setup` has installed the package)
COHORT = $(shell $(BIN)/mmdm study --profile $(PROFILE) --show cohort)
DATA ?= $(shell $(BIN)/mmdm study --profile $(PROFILE) --show data-dir)
WORKERS ?= 2

.PHONY: setup data book study test test-slow test-all gpu-check clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	touch $@

setup: $(VENV)/.installed

## Build the phantom cohort for PROFILE and check it.
data: setup
	$(BIN)/mmdm data phantom --profile $(COHORT) --out $(DATA) --workers $(WORKERS)
	$(BIN)/mmdm data check $(DATA)

## Main job: the cohort, all 13 runs of PROFILE (skipping finished ones), the notebooks, the book (_build/html).
study: data
	$(BIN)/mmdm study --profile $(PROFILE) --jobs $(JOBS)
	@echo "The book is at _build/html/index.html"

## Rebuild the book from the run records in results/PROFILE alone (nothing is trained; missing
## records show as not yet measured), e.g. the published book: `make book PROFILE=standard`.
book: setup
	$(BIN)/mmdm study --profile $(PROFILE) --records-only

## Default test suite (fast tests; < 15 min on 2 cores).
test: setup
	$(BIN)/python -m pytest

## Only the tests marked slow.
test-slow: setup
	$(BIN)/python -m pytest -m slow

## Everything, slow tests included.
test-all: setup
	$(BIN)/python -m pytest -m ""

## One-shot GPU check (~10 min on one GPU; results under benchmarks/results/gpu-check/<device>).
## Needs a CUDA build of torch: `make TORCH_SPEC=torch gpu-check`. `make gpu-check GPU_CHECK_ARGS=--dry-run`
## checks the script on a CPU in about a minute.
GPU_CHECK_ARGS ?=
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
