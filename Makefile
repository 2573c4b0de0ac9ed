# `make test` and `make repro` set everything up on a fresh machine: they create .venv and install
# the project into it the first time (and again whenever pyproject.toml changes).
.DEFAULT_GOAL := help
SHELL := /bin/bash
# The interpreter .venv is made from: `make test PYTHON=/usr/bin/python3 VENV=.venv-system`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# make repro / make quick: JOBS runs side by side (a number, or auto: README, "Running the grid");
# EXECUTOR local, or slurm (the train stages as one Slurm job array); SLURM_ARGS overrides
# params.yaml's slurm section, e.g. SLURM_ARGS="partition=gpu timeout_min=120".
JOBS ?= auto
EXECUTOR ?= local
SLURM_ARGS ?=
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

## help: list the targets
.PHONY: help
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch and torchvision come together from the registry: the machine's local CPU torch wheel
	@# cannot import the registry's torchvision, which is a CUDA build. The pair works on CPU too.
	$(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[dev]"
	touch $@

## install: create .venv and install the project with its test dependencies
.PHONY: install
install: $(STAMP)

## test: run the whole suite (pytest and nbval), slow end-to-end tests included; not the Slurm tests
.PHONY: test
test: $(STAMP)
	$(PY) -m pytest

## test-slurm: bring up a throwaway one-node Slurm (installs its packages), train a small grid on it, tear it down
.PHONY: test-slurm
test-slurm: $(STAMP)
	@# The cluster lives in a temporary folder; the trap stops its daemons whatever happens.
	dir=$$(mktemp -d /tmp/slurm-test.XXXXXX) && trap 'scripts/slurm_cluster.sh down '"$$dir" EXIT && \
	  scripts/slurm_cluster.sh up "$$dir" && \
	  SLURM_CONF="$$dir/slurm.conf" $(PY) -m pytest -m slurm -rP -p no:cacheprovider tests/test_slurm.py

## test-fast: the suite without the slow end-to-end tests
.PHONY: test-fast
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not slurm"

## repro: fetch and check CIFAR-10 (data.dvc), train the paper's grid JOBS at a time, build the report
.PHONY: repro
repro: $(STAMP)
	$(PY) -m replicate.pipeline fetch
	$(PY) -m replicate.grid --jobs $(JOBS) --executor $(EXECUTOR) $(if $(SLURM_ARGS),--slurm $(SLURM_ARGS))

## quick: Fig. 1 and the ResNet fix on a CPU in about 15 minutes (params.yaml quick; reports/quick/)
.PHONY: quick
quick: $(STAMP)
	$(PY) -m replicate.pipeline fetch
	$(PY) -m replicate.grid --profile quick --jobs $(JOBS) --executor $(EXECUTOR) $(if $(SLURM_ARGS),--slurm $(SLURM_ARGS))

## lab: open JupyterLab here, in .venv: notebooks/ and every executed run in results/
.PHONY: lab
lab: $(STAMP)
	@# The venv's kernels first: a user's own "python3" kernel (~/.local/share/jupyter) would win.
	JUPYTER_PATH=$(abspath $(VENV))/share/jupyter jupyter lab

## gpu-check: on a GPU machine, every open GPU question in one command, ~5.5 min (reports/gpu-check/; GPU_CHECK_ARGS="--sample X.npz")
.PHONY: gpu-check
gpu-check:
	@# No $(STAMP): it runs on a bare GPU image with torch and numpy alone (docs/speed.md).
	PYTHONPATH=. python3 scripts/gpu_check.py --out reports/gpu-check $(GPU_CHECK_ARGS)

## bench: engine vs a reference-style trainer, ResNet-20 and -56 side by side (reports/bench.json; BENCH_ARGS="--concurrent 4")
.PHONY: bench
bench: $(STAMP)
	$(PY) -m replicate.bench $(BENCH_ARGS)
