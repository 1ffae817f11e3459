# The two commands a new user needs: make demo, make test. Each sets up .venv first when it is
# missing or older than pyproject.toml (make install does only that).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Point the asset cache at a local folder to work offline (tests use ../shared/data).
export GPT2_CACHE_DIR ?= $(HOME)/.cache/gpt2

.PHONY: install demo chat-demo test test-numerics notebook lint format bench clean gpu-check gpu-check-dry-run llama-cpp

install: $(INSTALLED)  ## a virtual environment with torch 2.13.0 (CPU) and the package, editable, with test extras

# The stamp is written last: an install that fails halfway is redone by the next make.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,dev]"
	touch $@

demo: $(INSTALLED)  ## train a small character model on TinyShakespeare on the CPU, then sample
	$(BIN)/gpt2 train

# docs/chat.md, "A recipe that shows it works": pre-train a small model, fine-tune it on generated
# chat tasks, and score both on the held-out questions through the openai client (minutes, one thread).
chat-demo: $(INSTALLED)  ## pre-train a small model, fine-tune it on chat tasks, score both through gpt2 serve
	$(BIN)/python scripts/make_chat_tasks.py --out data/chat-tasks
	$(BIN)/gpt2 prepare --tokenizer gpt2 --out data/shakespeare-gpt2
	$(BIN)/gpt2 train --config chat_tasks_base
	$(BIN)/gpt2 prepare --chat --input data/chat-tasks/train.jsonl --out data/chat-tasks-sft
	$(BIN)/gpt2 train --config chat_tasks_sft
	$(BIN)/python scripts/chat_exact_match.py --heldout data/chat-tasks/heldout.jsonl --log-dir out \
		--checkpoint before=out/chat-tasks-base --checkpoint after=out/chat-tasks-sft

test: $(INSTALLED)  ## the test suite (what CI runs); assets from ../shared/data or the user's cache
	$(BIN)/python -m pytest

# The numerically sensitive tests again under the other kernel set than this CPU's own: AVX2 on
# an AVX-512 CPU, plain C++ on an AVX2 one. Sums taken in another order must still agree.
test-numerics: $(INSTALLED)  ## the tests marked numerics, under the older kernel set (CI runs this too)
	@if $(BIN)/python -c "import sys, torch; sys.exit(torch.backends.cpu.get_cpu_capability() != 'AVX512')"; \
	then isa=avx2 mkl=AVX2; else isa=default mkl=SSE4_2; fi; \
	echo "numerics under ATEN_CPU_CAPABILITY=$$isa MKL_ENABLE_INSTRUCTIONS=$$mkl"; \
	ATEN_CPU_CAPABILITY=$$isa MKL_ENABLE_INSTRUCTIONS=$$mkl $(BIN)/python -m pytest -m "numerics and not slow"

notebook: $(INSTALLED)  ## run notebooks/gpt2_walkthrough.ipynb top to bottom (a copy, outputs stripped); CI runs it
	$(BIN)/python scripts/run_notebook.py

gpu-check:  ## on a CUDA GPU: correctness, training MFU, decoding vs transformers (<= 8 min; bench/NOTES.md)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry-run:  ## the same steps on tiny shapes on the CPU (about a minute)
	$(BIN)/python bench/gpu_check.py --device cpu --quick --results-dir out/gpu-check

llama-cpp: $(INSTALLED)  ## build llama.cpp's tools (GGUF tests, llama-server for bench/bench_serve_llama_cpp.py), cached in ~/.cache/gpt2-llama.cpp
	PYTHON=$(BIN)/python bash scripts/build_llama_cpp.sh

lint: $(INSTALLED)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf out data .pytest_cache
