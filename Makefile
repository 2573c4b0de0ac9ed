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
# PAPER: whose runs make repro and make quick train: 2015 (the default) or 2016 (the sequel).
PAPER ?= 2015
EXECUTOR ?= local
SLURM_ARGS ?=
# TORCH_INDEX: where torch and torchvision come from. Empty: PyPI, today a CUDA 13.0 build (NVIDIA
# driver >= 580, GPUs sm_75 and up). A driver older than 580, or a V100 (sm_70):
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 (driver >= 525.60.13). The training commands
# name the one that fits when the installed torch cannot use the GPUs (replicate/gpus.py).
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

## help: list the targets
.PHONY: help
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

# Reinstalls when TORCH_INDEX differs from the last install's ($(VENV)/.torch-index; none: PyPI).
TORCH_CHANGED := $(filter-out x$(shell cat $(VENV)/.torch-index 2>/dev/null),x$(TORCH_INDEX))
$(STAMP): pyproject.toml $(if $(TORCH_CHANGED),FORCE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch and torchvision come together from the registry: the machine's local CPU torch wheel
	@# cannot import the registry's torchvision, which is a CUDA build. The pair works on CPU too.
	@# Another build of the same version counts as installed for pip: uninstalled first.
	$(if $(TORCH_CHANGED),$(PY) -m pip uninstall -y torch torchvision)
	$(PY) -m pip install torch torchvision $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo '$(TORCH_INDEX)' > $(VENV)/.torch-index
	$(PY) -m pip install -e ".[dev]"
	touch $@

## install: create .venv and install the project with its test dependencies (TORCH_INDEX: another CUDA build of torch)
.PHONY: install FORCE
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

## repro: fetch and check CIFAR-10 (data.dvc), train the paper's grid JOBS at a time, build the report (PAPER=2016: the sequel's, and CIFAR-100)
.PHONY: repro
repro: $(STAMP)
	$(PY) -m replicate.pipeline fetch --paper $(PAPER)
	$(PY) -m replicate.grid --paper $(PAPER) --jobs $(JOBS) --executor $(EXECUTOR) $(if $(SLURM_ARGS),--slurm $(SLURM_ARGS))

## quick: Fig. 1 and the ResNet fix on a CPU in about 15 minutes (params.yaml quick; reports/quick/); PAPER=2016: the sequel's (reports/2016/quick/)
.PHONY: quick
quick: $(STAMP)
	$(PY) -m replicate.pipeline fetch --paper $(PAPER) --profile quick
	$(PY) -m replicate.grid --paper $(PAPER) --profile quick --jobs $(JOBS) --executor $(EXECUTOR) $(if $(SLURM_ARGS),--slurm $(SLURM_ARGS))

## lab: open JupyterLab here, in .venv: notebooks/ and every executed run in results/
.PHONY: lab
lab: $(STAMP)
	@# The venv's kernels first: a user's own "python3" kernel (~/.local/share/jupyter) would win.
	JUPYTER_PATH=$(abspath $(VENV))/share/jupyter jupyter lab

## gpu-check: on a GPU machine, every open GPU question in one command, ~5.5 min (reports/gpu-check/; GPU_CHECK_ARGS="--sample X.npz")
.PHONY: gpu-check
gpu-check:
	@# No $(STAMP): it runs on the GPU image's own Python (torch, numpy, pandas, tqdm, pyyaml, psutil,
	@# Pillow, pytest; no DVC, papermill, jupyter, submitit or torchvision: docs/speed.md).
	PYTHONPATH=. python3 scripts/gpu_check.py --out reports/gpu-check $(GPU_CHECK_ARGS)

## bench: engine vs a reference-style trainer, ResNet-20 and -56 side by side (reports/bench.json; BENCH_ARGS="--concurrent 4")
.PHONY: bench
bench: $(STAMP)
	$(PY) -m replicate.bench $(BENCH_ARGS)
