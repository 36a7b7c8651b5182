# Bunch: `make dev` runs the whole stack locally, `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install dev test lint typecheck check bench smoke clean

install: $(VENV)/.installed

# The worker's pins constrain the services' install too, so the tests run the versions the worker ships.
$(VENV)/.installed: pyproject.toml worker/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]' -c worker/requirements.txt
	touch $@

# Your BUNCH_* variables and .env reach the services; DEV_ARGS="--port 8001 --redis-ha" for the stack.
DEV_ARGS ?=
dev: install  ## the whole stack on free ports: redis, S3 (moto), emulators, gateway, dispatcher, packager
	$(BIN)/python -m deploy.stack $(DEV_ARGS)

test: install  ## the test suite against real redis-server, S3 server and emulators
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy shared services deploy bench bunch_cli tests $(wildcard worker/*.py)

check: lint typecheck test

smoke: install  ## one small real job against real RunPod and Gemini (skipped, saying why, without their settings)
	$(BIN)/python -m deploy.smoke

bench: install  ## every benchmark of bench/ (minutes; not part of make test): writes bench/RESULTS.md
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
