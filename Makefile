# AGIASI Soul Fusion: Phi-3 base -> QLoRA + SO(8) soul -> fused HF model -> GGUF -> Ollama.
#
#   make demo            the whole chain on a tiny offline model, on CPU (start here)
#   make test            the test suite
#   make train|fuse|gguf|modelfile|ollama [CONFIG=config.yaml] [NPROC=2]
#   make help            everything else
#
# This file sets up the environment (virtual env, pinned llama.cpp) and hands
# the pipeline targets to pipeline.mk, which holds the artifact DAG.

CONFIG  ?= config.yaml
NPROC   ?= 1
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
TINY    := build/tiny-phi3
PYTEST_ARGS ?=
PROMPT  ?= こんにちは。自己紹介をしてください。

SUBMAKE := $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) NPROC=$(NPROC)
VENV_READY := $(VENV)/.installed
LLAMA_READY := $(VENV)/.llama-cpp

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.SUFFIXES:

.PHONY: help
help: ## Show this help
	@echo "AGIASI Soul Fusion. Targets (CONFIG=$(CONFIG)):"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-14s %s\n", $$1, $$2}'

# ---- environment ---------------------------------------------------------

$(VENV_READY): requirements/base.txt requirements/cpu.txt requirements/test.txt
	@echo "==> [venv] installing pinned Python packages into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/cpu.txt -r requirements/test.txt
	@touch $@

# The pinned llama.cpp is built once into a cache outside the clone, in a
# folder named by its pin (so a new pin is a new folder); the Python bindings
# (used by tests) go into the venv, linked to that same build.
LLAMA_DIR := $(shell bash scripts/build-llama-cpp.sh --print-dir)

$(LLAMA_DIR)/.complete: | $(VENV_READY)
	@echo "==> [llama.cpp] building the pinned llama.cpp into $(LLAMA_DIR)"
	PYTHON=$(PY) bash scripts/build-llama-cpp.sh

$(LLAMA_READY): $(LLAMA_DIR)/.complete $(VENV_READY)
	@echo "==> [llama.cpp] installing the Python bindings into $(VENV)"
	PYTHON=$(PY) bash scripts/build-llama-cpp.sh --bindings $(PY)
	@touch $@

.PHONY: venv llama-cpp
venv: $(VENV_READY) ## Create the virtual env with pinned packages
llama-cpp: $(LLAMA_READY) ## Build the pinned llama.cpp (cached outside the clone)

# ---- the pipeline (see pipeline.mk) --------------------------------------

.PHONY: train fuse gguf modelfile ollama ollama-run
train fuse: $(VENV_READY)
	@$(SUBMAKE) $@ CONFIG=$(CONFIG)
gguf modelfile ollama ollama-run: $(VENV_READY) $(LLAMA_READY)
	@$(SUBMAKE) $@ CONFIG=$(CONFIG) PROMPT="$(PROMPT)"
train: ## Train LoRA + soul: checkpoints/final
fuse: ## Merge LoRA and fold the soul: fused/ (HF model)
gguf: ## Convert and quantize: gguf/*.gguf
modelfile: ## Render the Ollama Modelfile
ollama: ## Register the model with Ollama and check that it answers
ollama-run: ## Ask the registered model: make ollama-run PROMPT="..."

$(TINY)/config.json: pipeline/tiny.py | $(VENV_READY)
	@echo "==> [tiny-model] building the tiny offline Phi-3 demo base"
	$(PY) -m pipeline tiny-model --out $(TINY)

.PHONY: demo
demo: $(VENV_READY) $(LLAMA_READY) $(TINY)/config.json ## Whole chain on the tiny model (CPU, offline)
	@$(SUBMAKE) ollama-if-available CONFIG=demo.yaml

# ---- checks --------------------------------------------------------------

.PHONY: test
test: $(VENV_READY) $(LLAMA_READY) ## Run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove build outputs of this clone (keeps the venv and the llama.cpp cache)
	rm -rf build
