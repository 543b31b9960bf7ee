# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed on its own first and pinned: an unpinned requirement resolved on its own
# would pull the newest CUDA build (several GB). Override with `make TORCH=torch==2.5.1 test`.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint figures clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,tensorboard,hf,onnx]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/distillab demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests

figures: install  # every plot under results/, from committed records (no training)
	$(BIN)/python benchmarks/figures.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
