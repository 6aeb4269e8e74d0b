# `make train` and `make test-all` set everything up on a fresh machine (Python 3.11 with venv) and run.
VENV ?= .venv
PYTHON ?= python3
# `mlflow run --env-manager local` calls `python` from PATH: make it the project's environment.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Use the MedMNIST files shipped beside the checkout when there are some (no internet needed).
SHARED_DATA := $(abspath ../shared/data/medmnist)
export MEDZOO_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/*.npz),$(SHARED_DATA),)
ARGS ?=
# `make train` trains on DATASET into the MLflow experiment of that name; `make study` runs study NAME.
DATASET ?= organamnist
NAME ?= organamnist-architectures
BUDGET ?= quick

.PHONY: setup train study test test-all lint ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements-dev.txt -e .
	$(VENV)/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

train: setup
	mlflow run . -e train --env-manager local --experiment-name $(DATASET) -P dataset=$(DATASET) $(ARGS)

study: setup
	mlflow run . -e study --env-manager local --experiment-name study-$(NAME) -P name=$(NAME) -P budget=$(BUDGET) $(ARGS)

# The fast tier: every module, no training beyond a few seconds, no subprocess or server (a few minutes).
test: setup
	python -m pytest -m "not slow and not e2e" $(ARGS)

# Every tier: in-process training (slow) and subprocesses, servers, PostgreSQL (e2e). What CI runs. Two pytest
# workers, a test file each at a time (module fixtures stay in one process): 9:48 against 13:07 in one on 2 cores.
# Each worker computes on cores / workers threads (tests/conftest.py): 10:06 against 11:59 with two machine-wide
# OpenMP pools (clean-clone CI runs of 2026-12-03, a 2048^2 matmul at 143 and 139 GFLOP/s).
TEST_WORKERS ?= 2
test-all: setup
	python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: setup
	ruff check contract zoo training serving benchmarks tests
	ruff format --check contract zoo training serving benchmarks tests
	lint-imports

ui: setup
	python -m training.cli ui --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
