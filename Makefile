# Quick start: `make demo` trains the CPU demo, `make test` runs the tests. Both create .venv
# and install the CPU build of torch 2.13.0 first (plain `pip install torch` pulls a CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loralab-installed

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,tracking,tensorboard]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/loralab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/python .ci/lint_bench_imports.py

clean:
	rm -rf runs swanlog .pytest_cache
