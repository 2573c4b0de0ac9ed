# `make test` and `make repro` set everything up on a fresh machine: they create .venv and install
# the project into it the first time (and again whenever pyproject.toml changes).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

## help: list the targets
.PHONY: help
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# torch and torchvision come together from the registry: the machine's local CPU torch wheel
	@# cannot import the registry's torchvision, which is a CUDA build. The pair works on CPU too.
	$(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[dev]"
	touch $@

## install: create .venv and install the project with its test dependencies
.PHONY: install
install: $(STAMP)

## test: run the whole suite (pytest and nbval), slow end-to-end tests included
.PHONY: test
test: $(STAMP)
	$(PY) -m pytest

## test-fast: the suite without the slow end-to-end tests
.PHONY: test-fast
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

## repro: fetch and check CIFAR-10 (data.dvc), then train the grid of params.yaml (dvc repro)
.PHONY: repro
repro: $(STAMP)
	$(PY) -m replicate.pipeline fetch
	dvc repro

## lab: open JupyterLab here, in .venv: notebooks/ and every executed run in results/
.PHONY: lab
lab: $(STAMP)
	@# The venv's kernels first: a user's own "python3" kernel (~/.local/share/jupyter) would win.
	JUPYTER_PATH=$(abspath $(VENV))/share/jupyter jupyter lab

## bench: engine vs a reference-style trainer, ResNet-20 and -56 side by side (reports/bench.json; BENCH_ARGS="--concurrent 4")
.PHONY: bench
bench: $(STAMP)
	$(PY) -m replicate.bench $(BENCH_ARGS)
