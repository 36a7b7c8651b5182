# Bunch: `make dev` runs the whole stack locally, `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-ts dev test lint typecheck deploy-check check bench bench-smoke smoke image worker-image clean openapi

TS_CLIENT := clients/typescript

install: $(VENV)/.installed
# The TypeScript client's packages (Node 20 and npm): what its tests in `make test` need, not `make dev`.
install-ts: $(TS_CLIENT)/node_modules/.installed

# requirements/dev.txt pins every package, the worker's and the services' included, with its hashes
# (the images install their own locks, held to the same versions: requirements/README.md).
$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The TypeScript client's packages, exactly as package-lock.json pins them (npm ci starts afresh).
$(TS_CLIENT)/node_modules/.installed: $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	npm --prefix $(TS_CLIENT) ci --no-audit --no-fund
	touch $@

# Your BUNCH_* variables and .env reach the services; DEV_ARGS="--port 8001 --redis-ha" for the stack.
DEV_ARGS ?=
dev: install  ## the whole stack on free ports: redis, S3 (moto), emulators, gateway, dispatcher, packager
	$(BIN)/python -m deploy.stack $(DEV_ARGS)

test: install install-ts  ## the test suite against real redis-server, S3 server and emulators (and Node 20)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy shared services deploy bench bunch_cli tests $(wildcard worker/*.py)

openapi: install install-ts  ## docs/openapi.json from the gateway, then the TypeScript client's types from it
	$(BIN)/python -m services.gateway.openapi_document
	npm --prefix $(TS_CLIENT) run generate

deploy-check:  ## compose, Dockerfiles and Kubernetes manifests against their schemas, linters and policies
	bash deploy/checks/run

check: lint typecheck deploy-check test bench-smoke

# Images (needs a Docker engine): tag them, push them, and pin the pushed digests (docs/deploy.md).
GIT_SHA      := $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
IMAGE        ?= bunch:$(GIT_SHA)
WORKER_IMAGE ?= bunch-worker:$(GIT_SHA)
image:  ## the services' image (gateway, dispatcher, packager)
	docker build -f deploy/docker/Dockerfile -t $(IMAGE) .

worker-image:  ## the RunPod worker's image
	docker build -f worker/Dockerfile -t $(WORKER_IMAGE) .

smoke: install  ## one small real job against real RunPod and Gemini (skipped, saying why, without their settings)
	$(BIN)/python -m deploy.smoke

bench: install  ## every benchmark of bench/ (about half an hour): judged by ratios, writes bench/RESULTS.md
	$(BIN)/python -m bench

bench-smoke: install  ## every benchmark at a tiny size, several at once (about a minute; CI runs it)
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .venv-checks .pytest_cache .mypy_cache .ruff_cache *.egg-info
	rm -rf $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist $(TS_CLIENT)/dist-e2e
