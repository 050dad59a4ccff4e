# The README's two commands are `make study` and `make test`.
# Everything happens inside a virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; override for a GPU box, e.g. `make TORCH_SPEC="torch" study`.
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= quick
DATA ?= data/phantom-$(PROFILE)
WORKERS ?= 2

.PHONY: setup data book study test test-slow test-all clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	touch $@

setup: $(VENV)/.installed

## Build the phantom cohort for PROFILE and check it.
data: setup
	$(BIN)/mmdm data phantom --profile $(PROFILE) --out $(DATA) --workers $(WORKERS)
	$(BIN)/mmdm data check $(DATA)

## Execute the notebooks with papermill into book/generated/, then build the book (_build/html).
book: setup
	mkdir -p book/generated
	$(BIN)/mmdm methods --deviations --out book/generated/deviations.md
	$(BIN)/papermill --cwd . notebooks/01_data.ipynb book/generated/01_data.ipynb \
		-p profile $(PROFILE) -p data_dir $(DATA)
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going
	@echo "The book is at _build/html/index.html"

## Main job: cohort, checks, notebooks, book.
study: data book

## Default test suite (fast tests; < 15 min on 2 cores).
test: setup
	$(BIN)/python -m pytest

## Only the tests marked slow.
test-slow: setup
	$(BIN)/python -m pytest -m slow

## Everything, slow tests included.
test-all: setup
	$(BIN)/python -m pytest -m ""

clean-venv:
	rm -rf $(VENV)
