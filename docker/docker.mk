# The CUDA Docker image (docker/Dockerfile); included by the Makefile.
#
#   make docker-build [CUDA_DOCKER_ARCH="86;90"]      build the image
#   make docker-run TARGET=gguf [CONFIG=my.yaml]      run a make target in the image, on all GPUs
#   make docker-smoke                                 check the GPU paths inside the image
#
# docker-run mounts this clone at /workspace and the host's Hugging Face cache at
# /cache/huggingface, runs as the calling user (what it writes into the clone is yours),
# passes HF_TOKEN through only when it is set (never baked into the image), and points
# OLLAMA_HOST at an Ollama on the host. The image brings its own Python environment and
# llama.cpp build: nothing is installed into the clone (see AGIASI_IMAGE_ENV in the Makefile).

DOCKER             ?= docker
DOCKER_IMAGE       ?= agiasi-soul-fusion:cuda
# CUDA architectures llama.cpp is compiled for; empty keeps the Dockerfile's default
# (86;89;80;90: RTX 30xx, RTX 40xx, A100, H100). Add 120 for RTX 50xx.
CUDA_DOCKER_ARCH   ?=
TARGET             ?=
# The host's Hugging Face cache, shared with the container (models are fetched once).
DOCKER_HF_CACHE    ?= $(or $(HF_HOME),$(HOME)/.cache/huggingface)
# Ollama on the host, as the container sees it. Ollama must listen beyond loopback for
# this (OLLAMA_HOST=0.0.0.0 ollama serve), or use DOCKER_RUN_ARGS=--network=host and
# DOCKER_OLLAMA_HOST=http://127.0.0.1:11434.
DOCKER_OLLAMA_HOST ?= http://host.docker.internal:11434
# Shared memory for the data loader and NCCL (NPROC>1); Docker's default is 64 MB.
DOCKER_SHM_SIZE    ?= 8g
DOCKER_RUN_ARGS    ?=

# What every run shares: all GPUs, the calling user, a terminal when there is one.
docker_run = $(DOCKER) run --rm --gpus all --user "$$(id -u):$$(id -g)" \
	$$(test -t 0 && test -t 1 && echo --interactive --tty) \
	--shm-size=$(DOCKER_SHM_SIZE) $(DOCKER_RUN_ARGS)

.PHONY: docker-build docker-run docker-smoke
docker-build: ## Build the CUDA image [CUDA_DOCKER_ARCH="86;90"] [DOCKER_IMAGE=...]
	$(DOCKER) build --file docker/Dockerfile --tag $(DOCKER_IMAGE) \
	  $(if $(CUDA_DOCKER_ARCH),--build-arg CUDA_DOCKER_ARCH="$(CUDA_DOCKER_ARCH)") .

docker-run: ## Run a target in the image on the GPUs: make docker-run TARGET=gguf [CONFIG=...]
	@test -n "$(TARGET)" || { echo "usage: make docker-run TARGET=train|fuse|gguf|ollama|demo|test [CONFIG=...] [NPROC=...]" >&2; exit 2; }
	mkdir -p "$(DOCKER_HF_CACHE)"
	$(docker_run) \
	  -v "$(CURDIR):/workspace" -w /workspace \
	  -v "$(DOCKER_HF_CACHE):/cache/huggingface" -e HF_HOME=/cache/huggingface \
	  -e HF_TOKEN \
	  --add-host=host.docker.internal:host-gateway -e OLLAMA_HOST="$(DOCKER_OLLAMA_HOST)" \
	  $(DOCKER_IMAGE) make $(TARGET) CONFIG="$(CONFIG)" NPROC=$(NPROC) PROMPT="$(PROMPT)"

docker-smoke: ## Check the image on the GPU: CUDA, NF4, llama.cpp, the demo chain
	mkdir -p build/docker-smoke
	$(docker_run) -v "$(CURDIR)/build/docker-smoke:/out" -e SMOKE_OUT=/out \
	  $(DOCKER_IMAGE) bash docker/smoke
