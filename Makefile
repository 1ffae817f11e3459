# The two commands a new user needs: make demo, make test. Each sets up .venv first when it is
# missing or older than pyproject.toml (make install does only that).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Point the asset cache at a local folder to work offline (tests use ../shared/data).
export GPT2_CACHE_DIR ?= $(HOME)/.cache/gpt2

.PHONY: install demo test notebook lint format bench clean

install: $(INSTALLED)  ## a virtual environment with torch 2.13.0 (CPU) and the package, editable, with test extras

# The stamp is written last: an install that fails halfway is redone by the next make.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,dev]"
	touch $@

demo: $(INSTALLED)  ## train a small character model on TinyShakespeare on the CPU, then sample
	$(BIN)/gpt2 train

test: $(INSTALLED)  ## the test suite (what CI runs); assets from ../shared/data or the user's cache
	$(BIN)/python -m pytest

notebook: $(INSTALLED)  ## run notebooks/gpt2_walkthrough.ipynb top to bottom (a copy, outputs stripped); CI runs it
	$(BIN)/python scripts/run_notebook.py

lint: $(INSTALLED)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf out data .pytest_cache
