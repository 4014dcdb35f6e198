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

.PHONY: install demo test test-numerics test-gguf test-tool-agents test-docs test-fuzz docs lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not llamacpp and not tool_agents and not docs_walkthrough" tests

# The tests whose outcome rests on floating-point agreement (`-m numerics`), once under each setting
# that changes which kernels MKL, oneDNN and ATen run: Intel CPUs take AVX-512/AMX paths that AMD
# ones do not (MKL_CBWR=AVX512 asks for Intel's branch anywhere), so bounds must hold on all of them.
NUMERICS_SETTINGS ?= default ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE \
	MKL_CBWR=AVX512 ONEDNN_MAX_CPU_ISA=AVX2
test-numerics: $(STAMP)
	@for setting in $(NUMERICS_SETTINGS); do \
		echo "== numerics under $$setting"; \
		env $$(test $$setting = default || echo $$setting) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
			-m "numerics and not llamacpp" tests || exit 1; \
	done

# GGUF files checked by llama.cpp itself. llama-cpp-python builds from source for this CPU's
# instruction sets (never -march=native, never AMX) on first use (~7 min on 2 cores); the wheel is
# kept per set of flags, so later runs start at once.
test-gguf: $(STAMP)
	$(BIN)/python tests/install_llamacpp.py
	$(BIN)/python -m pytest -q -m llamacpp tests/test_gguf_llamacpp.py

# Real agent frameworks (the OpenAI Agents SDK, LangChain) drive a model lmforge taught to call tools:
# examples/tool_calling.py trains it first (~10-15 min on 2 cores).
test-tool-agents: $(STAMP)
	$(BIN)/python -m pytest -q -m tool_agents tests/test_tool_agents.py

# The server's API fuzzed from its OpenAPI document at length (make test runs 40 examples per operation).
test-fuzz: $(STAMP)
	LMFORGE_FUZZ_EXAMPLES=200 $(BIN)/python -m pytest -q tests/test_serve_fuzz.py

# The documentation site in site/: --strict fails on a broken link, a missing page or a bad reference.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Every guide's commands, in the guides' order, on a fresh clone of this repository (outputs of one
# guide feed the next); blocks marked `<!-- docs-test: skip ... -->` say why they cannot run here.
# DOCS_SLOW=1 also runs the blocks marked slow (the agent's and the scaling sweep's budgets: ~25 min more).
test-docs: $(STAMP)
	LMFORGE_DOCS_SLOW=$(DOCS_SLOW) $(BIN)/python -m pytest -q -x -s -m docs_walkthrough tests/test_docs_walkthrough.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
