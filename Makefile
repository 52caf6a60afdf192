# fastdiff: every target sets itself up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --constraint constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: quickstart test lint bench bench-baseline bench-check gpu-check device-bundle install clean dist

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
	$(BIN)/ruff check fastdiff tests benches
	$(BIN)/ruff format --check fastdiff tests benches

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

# The gate's baseline: the latest make bench, kept in git (commit it with its RESULTS.md).
bench-baseline: .benchmarks/latest.json
	cp .benchmarks/latest.json benches/baseline.json

# Regression gate (not part of make test: these machines are noisy). Reads ratios
# measured within one run, which carry from machine to machine where absolute times do
# not: each train step's speed-up over the diffusers peer (interleaved, with its
# interval) must stay within 25% of the committed baseline's, and each sampler's
# overhead over its bare forward passes too (benches/gate.py; exit 2: inconclusive).
bench-check: $(STAMP)
	$(BIN)/python -m pytest benches -k "test_train_step or test_sampler" \
		-p no:randomly --benchmark-only --benchmark-json=.benchmarks/check.json
	$(BIN)/python -m benches.gate .benchmarks/check.json --baseline benches/baseline.json

# On a lent GPU: GPU tests, kernel benches, eager vs compiled steps (batch 4 and 128,
# MFU), CUDA graphs, a 200-step e9b with FID; one JSON summary (benches/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m benches.gpu_check --out gpu-check.json --budget 290

# The lent GPU machine's own image (torch 2.11, no package registry) lacks hydra,
# omegaconf, webdataset and torch-fidelity: copy them, pure Python, from the venv into
# .deps for device-run.sh (carry .deps; docs/performance.md, "On a lent GPU").
device-bundle: $(STAMP)
	$(BIN)/python -m benches.device bundle --out .deps

# The sdist and the wheel (into dist/), with the project's pinned setuptools; the wheel
# test (tests/test_package.py) holds it to the checkout.
dist: $(STAMP)
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')"

clean:
	rm -rf $(VENV) runs .pytest_cache
