# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates or updates .venv (CPU torch 2.13.0 first, then the package with its dev extras).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench bench-deps clean install

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,transformers,bench,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tensorslim demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The default test run plus tests marked slow.
test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

# Data the benchmarks need from Debian (Fashion-MNIST for cnn_fashion, the fortunes sentences for
# minilm, Jane Austen's novels for lm_text); idempotent, needs root.
bench-deps:
	test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz || \
		(apt-get update && apt-get install -y dataset-fashion-mnist)
	test -f /usr/share/games/fortunes/fortunes || \
		(apt-get update && apt-get install -y fortunes)
	test -f /usr/lib/R/site-library/janeaustenr/data/Rdata.rdx || \
		(apt-get update && apt-get install -y r-cran-janeaustenr)

bench: $(STAMP)
	$(BIN)/python benchmarks/linear_speed.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
