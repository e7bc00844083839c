# AGIASI Soul Fusion: Phi-3 base -> QLoRA + SO(8) soul -> fused HF model -> GGUF -> Ollama.
#
#   make demo            the whole chain on a tiny offline model, on CPU (start here)
#   make test            the test suite
#   make data|train|fuse|gguf|modelfile|ollama [CONFIG=config.yaml] [NPROC=2]
#   make monitor|plots|eval  watch a training, draw it, judge the models
#   make help            everything else
#
# This file sets up the environment (virtual env, pinned llama.cpp) and hands
# the pipeline targets to pipeline.mk, which holds the artifact DAG.

CONFIG  ?= config.yaml
NPROC   ?= 1
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
# make demo runs demo.yaml on the tiny Phi-3; FAMILY=llama3|qwen2|qwen3|gemma3 runs the same demo on that
# family's tiny model, with demo.yaml's settings in a run of its own (build/demo-<family>/).
FAMILY  ?= phi3
TINY    := build/tiny-$(FAMILY)
DEMO_CONFIG := $(if $(filter phi3,$(FAMILY)),demo.yaml,build/demo-$(FAMILY).yaml)
PYTEST_ARGS ?=
PROMPT  ?= こんにちは。自己紹介をしてください。

SUBMAKE := $(MAKE) --no-print-directory -f pipeline.mk PY=$(PY) NPROC=$(NPROC)
# A build holds its run folder's lock (pipeline/runlock.py) for its whole life: a
# second `make` on the same run waits for the first, then finds its work done.
locked = $(PY) -m pipeline locked --config "$(1)" --
VENV_READY := $(VENV)/.installed
LLAMA_READY := $(VENV)/.llama-cpp
# In the Docker image (docker/Dockerfile) the image is the environment: it sets
# VENV=/opt/venv, GGML_CUDA=ON and AGIASI_IMAGE_ENV=1, and nothing is installed or
# built into the mounted clone (an empty target list makes those rules no-ops).
UI_READY := pipeline/ui/node_modules/.installed
BROWSER_READY := browser
GO_READY := go
ifeq ($(AGIASI_IMAGE_ENV),1)
VENV_READY :=
LLAMA_READY :=
UI_READY :=
BROWSER_READY :=
GO_READY :=
endif

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
# (used by tests) go into the venv, linked to that same build. The script
# checks the cached build (and rebuilds one that lacks a tool it now builds),
# so a new pin or a new script re-runs it.
LLAMA_DIR := $(shell bash scripts/build-llama-cpp.sh --print-dir)

$(LLAMA_READY): $(VENV_READY) scripts/build-llama-cpp.sh scripts/llama-cpp.pin
	@echo "==> [llama.cpp] pinned llama.cpp in $(LLAMA_DIR), Python bindings in $(VENV)"
	PYTHON=$(PY) bash scripts/build-llama-cpp.sh --bindings $(PY)
	@touch $@

.PHONY: venv llama-cpp
venv: $(VENV_READY) ## Create the virtual env with pinned packages
llama-cpp: $(LLAMA_READY) ## Build the pinned llama.cpp (cached outside the clone)

# The dashboard's one JavaScript library (uPlot, pinned with its hash by
# pipeline/ui/package-lock.json), from the npm registry into pipeline/ui/node_modules
# (ignored by git); installed again when the lock changes. No install scripts run.
$(UI_READY): pipeline/ui/package.json pipeline/ui/package-lock.json
	@echo "==> [ui] installing the dashboard's pinned JavaScript (npm ci)"
	cd pipeline/ui && npm ci --ignore-scripts --no-audit --no-fund
	@touch $@

# The browser test (tests/test_browser.py) drives Debian's chromium; the page's
# Japanese labels need a Japanese font. Installed with apt when missing (sudo unless root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
.PHONY: ui browser
ui: $(UI_READY) ## Install the dashboard's pinned JavaScript (npm ci)
browser: ## Install Debian's chromium and a Japanese font for the browser test
	@if ! command -v chromium >/dev/null || ! fc-list :lang=ja 2>/dev/null | grep -q .; then \
	  echo "==> [browser] installing Debian's chromium and fonts-noto-cjk (apt-get)"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium fonts-noto-cjk; \
	fi
# The tests render Ollama TEMPLATEs with Go's own text/template (tests/gotemplate.py builds
# tests/gotmpl with it, standard library only). Installed with apt when missing.
.PHONY: go
go: ## Install Debian's Go for the template oracle
	@if ! command -v go >/dev/null; then \
	  echo "==> [go] installing Debian's golang-go (apt-get)"; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y golang-go; \
	fi
serve: $(UI_READY)

# ---- the pipeline (see pipeline.mk) --------------------------------------

.PHONY: data train fuse model-card gguf modelfile ollama ollama-run monitor plots eval serve
data train fuse model-card: $(VENV_READY)
	@$(call locked,$(CONFIG)) $(SUBMAKE) $@ CONFIG="$(CONFIG)"
gguf modelfile ollama ollama-run eval: $(VENV_READY) $(LLAMA_READY)
	@$(call locked,$(CONFIG)) $(SUBMAKE) $@ CONFIG="$(CONFIG)" PROMPT="$(PROMPT)"
# Readers: they run beside a training (no lock).
monitor plots: $(VENV_READY)
	@$(SUBMAKE) $@ CONFIG="$(CONFIG)"
# The server reads the run too (a long-lived reader: no lock). SERVE_ARGS="--port 9000 --backend URL"
SERVE_ARGS ?=
serve: $(VENV_READY)
	@$(SUBMAKE) $@ CONFIG="$(CONFIG)" SERVE_ARGS="$(SERVE_ARGS)"
data: ## Prepare the training data: data/ (train, validation), reports/data.md
train: ## Train LoRA + soul: checkpoints/final
fuse: ## Merge LoRA and fold the soul: fused/ (HF model, with its model card)
model-card: ## Rewrite the model card fused/README.md when a figure it states changed
gguf: ## Convert and quantize: gguf/*.gguf
modelfile: ## Render the Ollama Modelfile
ollama: ## Register the model with Ollama and check that it answers
ollama-run: ## Ask the registered model: make ollama-run PROMPT="..."
monitor: ## Follow training live: step, phase, alpha, gate, loss, ETA
plots: ## Plot alpha/gate with the phases, loss, orthogonality: reports/*.png
eval: ## Held-out Japanese perplexity of every model: reports/eval.md
serve: ## Serve /think, an OpenAI-compatible /v1 (only <final>) and the dashboard on 127.0.0.1:8642

# Its tokenizer and chat template are the family's real ones, from the pinned llama.cpp's source
# (Phi-3.5's for the default demo).
$(TINY)/config.json: pipeline/tiny.py pipeline/vocab.py scripts/llama-cpp.pin | $(VENV_READY) $(LLAMA_READY)
	@echo "==> [tiny-model] building the tiny offline $(FAMILY) demo base (its real tokenizer)"
	$(PY) -m pipeline tiny-model --family $(FAMILY) --out $(TINY)

build/demo-$(FAMILY).yaml: demo.yaml pipeline/demo.py | $(VENV_READY)
	$(PY) -m pipeline demo-config --family $(FAMILY) --tiny $(TINY) --out $@

.PHONY: demo
demo: $(VENV_READY) $(LLAMA_READY) $(TINY)/config.json $(DEMO_CONFIG) ## Whole chain on the tiny model (CPU, offline): FAMILY=qwen3 for another
	@$(call locked,$(DEMO_CONFIG)) $(SUBMAKE) ollama-if-available CONFIG=$(DEMO_CONFIG)

# ---- checks --------------------------------------------------------------

.PHONY: test
test: $(VENV_READY) $(LLAMA_READY) $(UI_READY) $(BROWSER_READY) $(GO_READY) ## Run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

# Mutation testing: each realistic bug of tests/mutants.py applied alone to a copy of the tree,
# run against the tests that should catch it; every mutant must be killed. Slow (about 15
# minutes), so not part of `make test`. MUTANTS=name[,name...] runs only those.
MUTANTS ?=
.PHONY: mutants
mutants: $(VENV_READY) $(LLAMA_READY) $(UI_READY) $(GO_READY) ## Check the tests catch each bug of tests/mutants.py (slow)
	$(PY) tests/mutants.py $(MUTANTS)

# The real run's cost at full size: a random Phi-3.5-mini-shaped base (3.8B; FAMILY=qwen3:
# Qwen3-4B's shape, 4.0B) through train, fuse, convert, quantize, each stage's wall time, peak
# memory and disk (about 40 minutes on 2 cores, 30 GB of disk under build/). LAYERS=4 for a quick one.
LAYERS ?=
.PHONY: bench-fullsize
bench-fullsize: $(VENV_READY) $(LLAMA_READY) ## Full-size rehearsal: every stage's time, memory, disk (FAMILY=qwen3: Qwen3-4B)
	$(PY) bench/fullsize.py --family $(FAMILY) $(if $(LAYERS),--layers $(LAYERS))

# The real path on a CUDA GPU (bench/gpu_proof.py): peak VRAM and tokens/s of training at the seeds'
# settings on a random Phi-3.5-mini-shaped base, against HF's Trainer + PEFT, fuse and its gate on the
# GPU; GPU_PROOF_ARGS=--llama-cuda adds llama.cpp built with GGML_CUDA=ON. In the CUDA image:
# make docker-run TARGET=gpu-proof. For an offline GPU machine without bitsandbytes, make gpu-proof-pack
# here writes the wheels and tokenizer it lacks into build/gpu-proof/travel (the script's docstring
# has the command to run there).
GPU_PROOF_ARGS ?=
.PHONY: gpu-proof gpu-proof-pack
gpu-proof: $(VENV_READY) $(LLAMA_READY) ## On a CUDA GPU: VRAM and speed at the seeds' settings vs HF Trainer + PEFT, fuse on the GPU
	$(PY) bench/gpu_proof.py $(GPU_PROOF_ARGS)

gpu-proof-pack: $(VENV_READY) $(LLAMA_READY) ## What an offline GPU machine lacks for gpu-proof: wheels + tokenizer (< 64 MiB)
	$(PY) bench/gpu_proof.py --pack

.PHONY: clean
clean: ## Remove build outputs of this clone (keeps the venv and the llama.cpp cache)
	rm -rf build

# The CUDA Docker image: docker-build, docker-run, docker-smoke.
include docker/docker.mk
