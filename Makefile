# The three commands a new user needs: make install, make demo, make test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Point the asset cache at a local folder to work offline (tests use ../shared/data).
export GPT2_CACHE_DIR ?= $(HOME)/.cache/gpt2

.PHONY: install demo test notebook lint format bench clean llama-cpp

install:  ## a virtual environment with torch 2.13.0 (CPU) and the package, editable, with test extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,dev]"

demo:  ## train a small character model on TinyShakespeare on the CPU, then sample
	$(BIN)/gpt2 train

test:  ## the test suite (what CI runs)
	$(BIN)/python -m pytest

notebook:  ## run notebooks/gpt2_walkthrough.ipynb top to bottom (a copy, outputs stripped); CI runs it
	$(BIN)/python scripts/run_notebook.py

llama-cpp:  ## build llama.cpp's tools for the GGUF tests, cached in ~/.cache/gpt2-llama.cpp (once)
	PYTHON=$(BIN)/python bash scripts/build_llama_cpp.sh

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf out data .pytest_cache
