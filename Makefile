# Two entry points: `make demo` (the main job on the embedded SmolLM2) and `make test`.
# Both create .venv on first use. torch comes from the pinned CPU build first, so the `torch>=2.6`
# range in pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test setup

$(BIN)/circuitdyn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/circuitdyn

demo: setup
	$(BIN)/circuitdyn demo

test: setup
	$(BIN)/python -m pytest -q
