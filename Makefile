# One command sets up a fresh machine and runs everything CI runs:   make test
# Environment lives in .venv at the repository root; re-running is quick when nothing changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wrpo-installed
CONSTRAINTS := requirements/cpu.txt
export OMP_NUM_THREADS ?= 1

.PHONY: setup test test-fast lint format run bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a wheel on disk on the CPU machine, never a CUDA download.
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while editing: everything but the tests marked slow (multi-process and end-to-end runs).
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

run: setup
	$(BIN)/python recipes/wrpo.py $(ARGS)

bench: setup
	$(BIN)/python benchmarks/logprobs_memory.py

clean-venv:
	rm -rf $(VENV)
