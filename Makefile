# cliptune: `make demo` and `make test` set everything up from nothing (a virtual environment in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find core train data eval configs -name '*.py' -o -name '*.yaml' 2>/dev/null)
DEMO_DATA ?= demo_data
DEMO_RUNS ?= demo_runs

.PHONY: setup lint test test-all test-fast demo demo-bilingual demo-data bench clean

# Dependencies: re-installed only when pyproject.toml changes.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $@

# Strict editable installs link each file: re-link when files are added (fast, no dependencies).
$(VENV)/.pkg: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-deps -e . --config-settings editable_mode=strict
	touch $@

setup: $(VENV)/.pkg

lint: setup
	$(VENV)/bin/ruff check core train data eval scripts tests
	$(VENV)/bin/mypy

test: setup
	$(PY) -m pytest -q -m "not exhaustive"

# every case of the fault harnesses too (each kill point, entry point x hostile kind): about 10 minutes more
test-all: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not ddp and not slow and not exhaustive"

demo-data: setup
	$(VENV)/bin/cliptune-demo-data --out $(DEMO_DATA)

demo: setup
	bash scripts/demo.sh

demo-bilingual: setup
	bash scripts/demo_bilingual.sh

bench: setup
	$(PY) scripts/bench_loss.py --quick
	$(PY) scripts/bench_retrieval.py --quick
	$(PY) scripts/bench_loader.py
	$(PY) scripts/bench_train.py --preset cpu

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_RUNS) $(DEMO_DATA)
