# cirlab: `make help` lists the targets. Everything runs inside .venv (created on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision: the releases this machine's pip finds locally (x86_64, Python 3.11); on
# other machines pip resolves the ranges of pyproject.toml instead. Override with TORCH_SPEC=.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_FLAGS ?=
ARGS ?=
# `make fit experiment=cresmd_paper trainer=gpu`: command-line variables other than the
# Makefile's own are passed to Hydra as overrides.
OVERRIDES := $(filter-out ARGS=% PYTEST_FLAGS=% TORCH_SPEC=% PYTHON=% VENV=%,$(MAKEOVERRIDES))

.PHONY: help install test test-fast train fit eval compare data bench-data bench-cost bench-train gpu-check lint clean clean-logs

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC) || $(BIN)/pip install torch torchvision
	$(BIN)/pip install -e ".[test,sweep,iqa,lint]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)  ## set-up: create .venv, install cirlab (editable) with its test, sweep, iqa and lint extras

test: $(STAMP)  ## the whole suite (slow tests included)
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

test-fast: $(STAMP)  ## the suite without tests marked slow (< 5 minutes)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_FLAGS)

train: $(STAMP)  ## the TASNet pipeline: CResMD, search, derive, fine-tune, evaluate, benchmark (offline, CPU, ~10 min)
	$(BIN)/cirlab-pipeline $(OVERRIDES) $(ARGS)

fit: $(STAMP)  ## one training job (cirlab-train): make fit experiment=cresmd_paper trainer=gpu
	$(BIN)/cirlab-train $(OVERRIDES) $(ARGS)

eval: $(STAMP)  ## score a checkpoint: make eval ckpt_path=... (data=cbsd68 by default)
	$(BIN)/cirlab-eval $(OVERRIDES) $(ARGS)

compare: $(STAMP)  ## CResMD, TASNet and the 3-D HyperRes trained alike, scored side by side (ARGS="--out logs/compare/x")
	$(BIN)/python -m cirlab.cli.compare $(ARGS)

data: $(STAMP)  ## download DIV2K and CBSD68 into data/ (needs internet; resumes, verifies checksums)
	$(BIN)/cirlab-data --root data $(ARGS)

bench-data: $(STAMP)  ## training-pipeline throughput (pairs/s) on CPU and GPU; merged into docs/bench/data.json
	$(BIN)/cirlab-bench data $(ARGS)

bench-cost: $(STAMP)  ## FLOPs and latency of CResMD/TSNet/TASNet/naive sharing on the 27-point workload; docs/bench/cost/
	$(BIN)/cirlab-bench cost $(ARGS)

bench-train: $(STAMP)  ## training steps/s per module at paper size, projected recipe wall times; docs/bench/train.json (ARGS="--variants fp32,bf16+cl")
	$(BIN)/cirlab-bench train $(ARGS)

gpu-check: $(STAMP)  ## every GPU check in <= 8 min (CUDA tests, data, training, Table-1 latency); a dry run without CUDA (ARGS=<out folder>)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/gpu_check.sh $(ARGS)

lint: $(STAMP)  ## ruff over src and tests, rules in pyproject.toml [tool.ruff.lint] (ARGS=--fix applies the safe fixes)
	$(BIN)/ruff check src tests $(ARGS)

clean:  ## remove caches (.cache, .pytest_cache, .ruff_cache, __pycache__); keeps logs/ (runs, checkpoints) and .venv
	rm -rf .cache .pytest_cache .ruff_cache
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +

clean-logs:  ## DELETE logs/: every run folder, checkpoint, sweep database and W&B offline run in it
	rm -rf logs

