# Everything a fresh machine needs is done by these targets (idempotent; re-run any time).
#   make sweep   the default sweep on built-in synthetic data (the product's main job)
#   make test    the whole test suite (what CI runs)
#   make test-fast  the edit-test loop: everything but the slow Ray end-to-end tests (< 2 min)
#   make bench   benchmarks; paste the tables into BENCHMARKS.md
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine keeps these torch/torchvision wheels on local disk (a CUDA build; it runs on the
# CPU too). On a cluster, point TORCH at the build that matches your CUDA, e.g. TORCH=torch.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install sweep train test test-fast lint bench clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

sweep: $(STAMP)
	$(BIN)/clipray sweep $(ARGS)

train: $(STAMP)
	$(BIN)/clipray train $(ARGS)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check clipray tests benchmarks
	$(BIN)/ruff format --check clipray tests benchmarks

bench: $(STAMP)
	@mkdir -p bench_out
	$(BIN)/python benchmarks/run_all.py $(ARGS) | tee bench_out/latest.md

clean-venv:
	rm -rf $(VENV)
