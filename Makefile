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
