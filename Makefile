# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test check lint layers format typecheck bench clean

# The pinned CPU wheel of torch goes in first, so nothing later pulls a CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# Train the demo MoE on the builtin corpus (about 10 minutes on 2 CPU cores) into runs/demo.
# A second `make demo` starts over; continue a stopped one with
# `.venv/bin/moekit train --out runs/demo --resume`.
demo: setup
	$(BIN)/moekit info demo
	rm -rf runs/demo
	$(BIN)/moekit train --config demo --out runs/demo

check: setup lint layers typecheck

lint: setup
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

# The import-linter contracts in pyproject.toml: layers from the ground up, no cycles.
layers: setup
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format src tests examples
	$(BIN)/ruff check --fix src tests examples

test: check
	$(BIN)/python -m pytest -n 2 --durations=15

bench: setup
	$(BIN)/moekit bench layer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
