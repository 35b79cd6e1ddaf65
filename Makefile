# One-command set-up on a fresh machine: `make train` (the main job) and `make test` (the suite).
# The CPU build of torch is pinned here for dev/CI only; on a GPU machine: make train TORCH_SPEC=torch
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC := deepspeed>=0.16,<0.20
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	@# CPU machines: DeepSpeed with its shared-memory all-reduce op compiled at install, so no process
	@# JIT-loads it (each load ran ninja under a lock, and some rebuilt it: ~55 s of a start-up).
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
		$(BIN)/pip install --quiet ninja && \
		DS_BUILD_SHM_COMM=1 MAX_JOBS=2 $(BIN)/pip install --quiet --no-build-isolation --no-cache-dir \
			"$(DEEPSPEED_SPEC)"; fi  # no cache: a cached wheel built without the op would be reused
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m launcher.warmup
	touch $(STAMP)

setup: $(STAMP)

# A small GPT-2 on this machine: 2 local processes (all GPUs where present), ZeRO-2, W&B offline.
train: $(STAMP)
	$(BIN)/bigmodel launch local configs/gpt2-tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests $(ARGS)

# Style and types, as CI checks them: ruff on everything, mypy on bigmodel_dist and launcher.
lint: $(STAMP)
	$(BIN)/ruff check bigmodel_dist launcher tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(ARGS)
