# The two commands a newcomer runs: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: train test lint format bench clean

# The venv is rebuilt when the project's dependencies change.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so pip never pulls a multi-GB CUDA build to satisfy the range.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,hf,qlora]"
	touch $@

# The default run: tiny BitNet b1.58 on the embedded corpus, about 3 minutes on 2 CPU cores.
# It starts afresh each time (--overwrite replaces the previous runs/tiny).
train: $(BIN)/.installed
	$(BIN)/bitnet-train train --config configs/tiny.yaml --overwrite $(ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/qat_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
