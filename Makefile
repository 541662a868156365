# Two entry points for a fresh machine: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
# The CPU build by default; for CUDA: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test setup lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/al train --dataset digits --arch mlp --method al --epochs 20 --out model --resume
	$(BIN)/al eval --model model --dataset digits

test: setup
	scripts/ensure-services
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
