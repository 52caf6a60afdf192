# fastdiff: every target sets itself up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --constraint constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: quickstart test lint bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m fastdiff.train quickstart

lint: $(STAMP)
	$(BIN)/ruff check fastdiff kernels tests benches

test: $(STAMP) lint
	$(BIN)/python -m pytest --benchmark-disable

bench: $(STAMP)
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m pytest benches --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache
