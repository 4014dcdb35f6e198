# lmforge: `make demo` trains and samples a small GPT; `make test` runs the test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
# The CPU wheel; an unpinned `torch` would pull a multi-GB CUDA build. Override for GPUs,
# e.g. `make install TORCH='torch --index-url https://download.pytorch.org/whl/cu124'`.
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmforge-installed
# pytest workers: 2 on a 2-core CI box; each worker's torch uses one thread (see tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: install demo test test-gguf lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not llamacpp" tests

# GGUF files checked by llama.cpp itself. llama-cpp-python builds from source on first install
# (~7 min on 2 cores); pip caches the wheel, so later runs start at once.
test-gguf: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[llamacpp]"
	$(BIN)/python -m pytest -q -m llamacpp tests/test_gguf_llamacpp.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
