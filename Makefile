# The whole set-up is two commands: `make train` and `make test`. Both create (or reuse) .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml
ARGS   ?=
# One thread per process keeps multi-process CPU tests from oversubscribing the cores.
export OMP_NUM_THREADS ?= 2

.PHONY: setup train test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) -m train $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
