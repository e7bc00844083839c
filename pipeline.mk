# The pipeline as a DAG of file targets, one rule per artifact, one command per recipe:
#
#   data sources -> data/ (prepared) ->
#   base model + prepared data -> checkpoints/final -> fused/ -> gguf/<run>-f16.gguf
#     [-> imatrix.gguf] -> gguf/<run>-q4_k_m.gguf -> Modelfile -> ollama.json (registered)
#
# The Makefile calls this after setting up the environment:
#   make -f pipeline.mk <target> CONFIG=config.yaml
# Paths come from `python -m pipeline plan`, which also rewrites each stage's
# config stamp (stamps/<stage>.stamp) only when that stage's keys change.

CONFIG ?= config.yaml
PY     ?= .venv/bin/python
NPROC  ?= 1
PIPE   := "$(PY)" -m pipeline
# NPROC>1: the same training in NPROC processes (DDP through torchrun), one per GPU.
TRAIN  := $(if $(filter-out 1,$(NPROC)),"$(PY)" -m torch.distributed.run --standalone --nproc-per-node=$(NPROC) -m pipeline,$(PIPE)) train

.DELETE_ON_ERROR:
.SUFFIXES:

# Validate the config, refresh the stamps, and learn the artifact paths (relative to
# this folder when inside it, so the clone's own location may have spaces). A bad config,
# or one naming a path make cannot take (a space in run.build_dir), prints its problems
# (on stderr) and stops here, before anything is built.
PLAN_FILE := $(shell $(PIPE) plan --config "$(CONFIG)")
ifneq ($(.SHELLSTATUS),0)
$(error $(CONFIG) is not usable (see above))
endif
include $(PLAN_FILE)

# One line per stage saying what it builds and why.
why = $(if $(wildcard $@),$(patsubst $(RUN_DIR)/%,%,$?) changed,$(patsubst $(RUN_DIR)/%,%,$@) does not exist)
announce = @echo "==> [$(1)] building $(patsubst $(RUN_DIR)/%,%,$@) because $(why)"

.PHONY: data train fuse gguf modelfile ollama plots eval model-card
data: $(DATA_REPORT)
train: $(CHECKPOINT)
fuse: $(FUSED) $(MODEL_CARD)
gguf: $(QUANTIZED) $(MODEL_CARD)
modelfile: $(MODELFILE)
ollama: $(OLLAMA_STAMP)
plots: $(PLOTS)
eval: $(EVAL_PASSED) $(MODEL_CARD)
model-card: $(MODEL_CARD)

# The data stage writes its report on every run, and the prepared files only when
# their content changes: a data.* change that keeps the same examples retrains nothing.
$(DATA_REPORT): $(STAMP_DIR)/data.stamp $(DATA)
	$(call announce,data)
	$(PIPE) data --config "$(CONFIG)"

$(PREPARED): $(DATA_REPORT) ;

$(CHECKPOINT): $(STAMP_DIR)/train.stamp $(PREPARED) $(BASE_DEPS)
	$(call announce,train)
	$(TRAIN) --config "$(CONFIG)"

$(FUSED): $(CHECKPOINT) $(STAMP_DIR)/fuse.stamp
	$(call announce,fuse)
	$(PIPE) fuse --config "$(CONFIG)"

# The model card, fused/README.md (pipeline/modelcard.py). Fuse writes it; convert, quantize
# and eval refresh it with the figures they record. This rule catches any other change of
# what it states: its prerequisites are exactly its inputs that exist (a report not written
# yet is no prerequisite, so asking for the card never runs eval). Its record is rewritten on
# every run and the card only when its bytes change, so registration, which carries the
# card to Ollama, follows the card's content, as the prepared data follow the data report.
$(CARD_RECORD): $(FUSED) $(DATA_REPORT) $(wildcard $(CARD_INPUTS))
	$(call announce,card)
	$(PIPE) model-card --config "$(CONFIG)"

$(MODEL_CARD): $(CARD_RECORD) ;

$(CONVERTED): $(FUSED) $(STAMP_DIR)/convert.stamp
	$(call announce,convert)
	$(PIPE) convert --config "$(CONFIG)"

# Optional (gguf.imatrix.calibration): an importance matrix of the converted
# model on calibration text, which every quantization then uses.
ifneq ($(IMATRIX),)
$(IMATRIX): $(CONVERTED) $(CALIBRATION) $(STAMP_DIR)/imatrix.stamp
	$(call announce,imatrix)
	$(PIPE) imatrix --config "$(CONFIG)"
endif

$(QUANTIZED): $(GGUF_DIR)/$(RUN_NAME)-%.gguf: $(CONVERTED) $(IMATRIX) $(STAMP_DIR)/quantize.stamp
	$(call announce,quantize)
	$(PIPE) quantize --config "$(CONFIG)" --type $*

# The Modelfile's text depends on config and template only; the GGUF it names
# must exist (order-only), and a new GGUF re-runs registration, not rendering.
$(MODELFILE): $(STAMP_DIR)/modelfile.stamp $(FAMILY_TEMPLATE) | $(SERVED_GGUF)
	$(call announce,modelfile)
	$(PIPE) modelfile --config "$(CONFIG)"

# Registration sends the model card as the model's license: a new card registers again.
$(OLLAMA_STAMP): $(MODELFILE) $(SERVED_GGUF) $(MODEL_CARD) $(STAMP_DIR)/register.stamp
	$(call announce,ollama)
	$(PIPE) register --config "$(CONFIG)"

# Reports. The figures follow metrics.jsonl, not the checkpoint: `make plots`
# during training draws the steps logged so far and never starts a training.
$(METRICS):
	@echo "error: $@ does not exist: no training step logged yet (make train)" >&2; exit 2

$(PLOTS) &: $(METRICS) $(STAMP_DIR)/plots.stamp
	$(call announce,plots)
	$(PIPE) plots --config "$(CONFIG)"

# Held-out perplexity of every model of the run. eval.json and eval.md are
# written whatever the outcome; eval.passed only when eval.max_ppl_ratio holds,
# so a failed eval is not taken as done.
$(EVAL_PASSED): $(CHECKPOINT) $(FUSED) $(CONVERTED) $(QUANTIZED) $(HELDOUT) $(BASE_DEPS) $(STAMP_DIR)/eval.stamp
	$(call announce,eval)
	$(PIPE) eval --config "$(CONFIG)"

# Follow a training run live (another terminal, or `docker exec` without -t).
.PHONY: monitor
monitor:
	@$(PIPE) monitor --config "$(CONFIG)"

# Talk to the registered model: make ollama-run PROMPT="富士山について教えて"
.PHONY: ollama-run
ollama-run: $(OLLAMA_STAMP)
	@$(PIPE) ask --config "$(CONFIG)" --prompt "$(PROMPT)"

# POST /think and the dashboard: make serve [SERVE_ARGS="--backend http://127.0.0.1:8080/v1"]
.PHONY: serve
serve:
	@$(PIPE) serve --config "$(CONFIG)" $(SERVE_ARGS)

# For `make demo`: register when an Ollama is reachable, else say how to get one and stop cleanly.
.PHONY: ollama-if-available
ollama-if-available: $(MODELFILE) $(MODEL_CARD)
	@if $(PIPE) ollama-status --config "$(CONFIG)"; then \
	  $(MAKE) --no-print-directory -f pipeline.mk ollama CONFIG="$(CONFIG)" PY="$(PY)"; \
	else \
	  echo "==> demo finished after the Modelfile: Ollama registration skipped (see above)"; \
	fi
