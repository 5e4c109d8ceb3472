# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# TORCH_SPEC picks the torch build: the default takes the CPU wheel on CPU-only machines here;
# elsewhere e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(EXTRAS)
export WANDB_MODE ?= disabled

.PHONY: setup test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check src callbacks evaluation tests

bench: setup
	$(PY) -m src.bench --out experiments/bench/cpu.json
