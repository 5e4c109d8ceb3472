# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# TORCH_SPEC picks the torch build. pip takes torch==2.13.0 from the first place that has it: on these project machines
# a local CPU wheel (pip's find-links); from the public index it is the default CUDA 13 build (needs an NVIDIA driver
# >= 580, and brings the CUDA libraries). Name the build you want: a CPU wheel with
# `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`, CUDA 12.8 with .../whl/cu128.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev,deepspeed,video,plots,wandb
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed-$(EXTRAS)
export WANDB_MODE ?= disabled

.PHONY: setup demo test test-fast lint bench bench-gpu gpu-check wheelhouse eval vbench-env

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The whole toy chain (shipped teacher -> ODE pairs -> ODE init -> hiar_fkl -> 20 s videos -> report), 2 CPU cores.
demo: setup
	$(PY) -m src.demo

# TEST_WORKERS pytest-xdist processes, each module on one of them (its module fixtures built once), one thread each
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadscope --durations=15

# the unit tests alone (one piece each, no training runs, compile or processes); the target is under 60 s on 2 quiet cores
test-fast: setup
	$(PY) -m pytest tests/unit --durations=10

lint: setup
	$(PY) -m ruff check src callbacks evaluation tests

bench: setup
	$(PY) -m src.perf cpu --out experiments/bench/cpu.json
	$(PY) -m src.perf cpu --throughput --throughput-out experiments/bench/throughput.json
	$(PY) -m src.perf cpu --fused-writes --fused-out experiments/bench/fused_writes.json

# BENCH_GPU_ARGS: e.g. "--smoke --dtype bfloat16" checks the bf16 code path on CPU
BENCH_GPU_ARGS ?=
bench-gpu: setup
	$(PY) -m src.perf gpu --out experiments/bench $(BENCH_GPU_ARGS)

# The prepared first GPU run: `python -m src.perf check`, budgeted (CHECK_BUDGET_S, default 420 s) and incremental:
# OUT/gpu_check.json is rewritten after every result (src/perf/check.py). On a GPU node without network and without
# this project's venv: `make gpu-check PYTHON=python3 WHEELHOUSE=wheelhouse OUT=<dir>` uses that interpreter's torch,
# keeps every package it has inside pyproject's ranges and installs the rest from the wheelhouse with --no-index into
# $(NODE_DEPS) (src/perf/offline.py). Without WHEELHOUSE it runs in the project venv (`make setup`).
OUT            ?= gpu-check-out
NODE_DEPS      ?= .gpu-check-deps
CHECK_BUDGET_S ?= 420
CHECK_ARGS     ?=
NODE_PATH      := $(abspath $(NODE_DEPS))$${PYTHONPATH:+:$$PYTHONPATH}
gpu-check:
ifdef WHEELHOUSE
	PYTHONPATH=$(NODE_PATH) $(PYTHON) src/perf/offline.py install --wheelhouse $(WHEELHOUSE) --target $(NODE_DEPS)
	PYTHONPATH=$(NODE_PATH) $(PYTHON) -m src.perf check --out $(OUT) --budget-s $(CHECK_BUDGET_S) $(CHECK_ARGS)
else
	$(MAKE) setup
	$(PY) -m src.perf check --out $(OUT) --budget-s $(CHECK_BUDGET_S) $(CHECK_ARGS)
endif

# Every non-torch wheel the project needs on the GPU node (CPython WHEELHOUSE_PYTHON, manylinux x86_64), resolved as
# pip would there, into $(WHEELHOUSE_DIR) (< 40 MiB; antlr4 4.9.3 built from its sdist). Needs the package index, not
# the venv. WHEELHOUSE_PROVIDED: packages the node has, left out to keep the folder small (empty: everything).
WHEELHOUSE_DIR      ?= wheelhouse
WHEELHOUSE_PYTHON   ?= 3.12
WHEELHOUSE_PROVIDED ?= numpy transformers tokenizers
wheelhouse:
	$(PYTHON) src/perf/offline.py wheelhouse --out $(WHEELHOUSE_DIR) --python-version $(WHEELHOUSE_PYTHON) \
		--provided $(WHEELHOUSE_PROVIDED)

# Evaluation report (evaluation/run.py, conf/eval.yaml): `make eval EVAL_ARGS="videos_dir=DIR"`; with no videos_dir the
# toy world evaluates its procedural ground truth. Output under logs/eval/runs/<time>/ (report.md, report.json, plots/).
EVAL_ARGS ?=
eval: setup
	$(PY) -m evaluation.run $(EVAL_ARGS)

# VBench's own environment (Python <= 3.11: transformers==4.33.2 needs tokenizers<0.14; numpy<2). torch < 2.6 because
# VBench calls torch.load without weights_only. dreamsim, scenedetect and moviepy<2 are VBench-Long's undeclared imports.
VBENCH_PYTHON     ?= python3.11
VBENCH_VENV       ?= .venv-vbench
# Every install step runs under one constraints file (torch==2.5.1, torchvision==0.20.1), so no step moves torch.
VBENCH_CONSTRAINTS ?= evaluation/vbench-constraints.txt
VBENCH_TORCH_SPEC ?= torch torchvision
vbench-env: $(VBENCH_VENV)/.installed

$(VBENCH_VENV)/.installed: $(VBENCH_CONSTRAINTS) evaluation/vbench-requirements.txt
	$(VBENCH_PYTHON) -c 'import sys; assert sys.version_info[:2] <= (3, 11), "VBench needs Python <= 3.11"'
	test -x $(VBENCH_VENV)/bin/python || $(VBENCH_PYTHON) -m venv $(VBENCH_VENV)
	$(VBENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VBENCH_VENV)/bin/python -m pip install --quiet -c $(VBENCH_CONSTRAINTS) $(VBENCH_TORCH_SPEC)
	$(VBENCH_VENV)/bin/python -m pip install --quiet -c $(VBENCH_CONSTRAINTS) -r evaluation/vbench-requirements.txt
	$(VBENCH_VENV)/bin/python -c "import vbench, vbench2_beta_long"
	touch $@
