# Two entry points for a fresh machine: `make run` and `make test`. Both set up .venv first.
VENV ?= .venv
# The CPU build by default; for CUDA: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH ?= torch==2.13.0
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test setup lint deploy-up deploy-down test-deploy

# pyproject.toml names the packages and the `al.commands` entry points (`al serve`, `al worker`, `al bench`),
# which reach the venv only at install time: a change to it re-installs.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# The service: API + a worker on http://127.0.0.1:8000 (HOST=0.0.0.0 to listen on every address).
# Without REDIS_URL: an embedded broker and store under AL_DATA_DIR (default ./data); see docs/service.md.
HOST ?= 127.0.0.1
PORT ?= 8000
run: setup
	$(BIN)/al serve --host $(HOST) --port $(PORT)

# Two pytest processes share the tests (most wait on servers and workers), file by file; the `serial` ones, which
# bound latency, run afterwards alone.
test: setup
	scripts/ensure-services
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not deploy and not serial"
	$(BIN)/python -m pytest -q -m serial

lint: setup
	$(BIN)/ruff check .

# The compose stack on a real Docker engine (installed and started where missing, as root), the
# API on http://127.0.0.1:8000: local base images where Docker Hub cannot be reached, torch from a
# local wheel, the host's CA bundle for the build. See docs/deploy.md.
deploy-up:
	scripts/deploy up

# Removes the stack's containers, networks and volumes.
deploy-down:
	scripts/deploy down

# Opt-in: the stack under faults, through its published port (tests/deploy/); `make test` skips it.
test-deploy: setup
	$(BIN)/python -m pytest -q -s -m deploy tests/deploy
