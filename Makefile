# fastdiff: every target sets itself up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --constraint constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: quickstart test lint bench bench-check gpu-check install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m fastdiff.train quickstart

lint: $(STAMP)
	$(BIN)/ruff check fastdiff kernels tests benches
	$(BIN)/ruff format --check fastdiff kernels tests benches

# The benches also run here once, untimed, on tiny shapes, so they never rot. One
# xdist worker per core, each with its share of the threads (tests/conftest.py);
# docs/performance.md has what that saves.
test: $(STAMP) lint
	FASTDIFF_BENCH_SMOKE=1 $(BIN)/python -m pytest -n logical --dist worksteal \
		--benchmark-disable --durations=15

bench: $(STAMP)
	$(BIN)/python -m pytest benches -p no:randomly --benchmark-only --benchmark-autosave \
		--benchmark-json=.benchmarks/latest.json
	$(BIN)/python -m benches.ratios .benchmarks/latest.json --out benches/RESULTS.md

# Regression gate (not part of make test: these machines are noisy). Fails when
# fastdiff's training step or sampler is more than 25% slower (median) than the
# committed baseline of this machine class (benches/baseline, from a `make bench`).
# The diffusers peers are not gated: they are not ours, and the peer with glibc's
# default allocator moves by 25% between fresh processes on its own.
bench-check: $(STAMP)
	$(BIN)/python -m pytest benches -k "fastdiff_train_step or sampler or bare_forward" --benchmark-only \
		--benchmark-storage=file://benches/baseline --benchmark-compare=0001 \
		--benchmark-compare-fail=median:25%

# On a lent GPU: GPU tests, kernel benches, eager vs compiled steps (batch 4 and 128,
# MFU), CUDA graphs, a 200-step e9b with FID; one JSON summary (benches/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m benches.gpu_check --out gpu-check.json --budget 290

clean:
	rm -rf $(VENV) runs .pytest_cache
