# Everyday commands. Each target creates the virtual environment first when it is missing or when
# requirements.txt has changed, so a fresh clone needs nothing but Python 3.11 and make. The test
# targets also install requirements-launchers.txt, the Hydra launcher plugins the sweep tests use.
# Python 3.11 by default; falls back to python3 when no python3.11 is on PATH, and stops with an
# error when that python3 is older than 3.11.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
LAUNCHERS_STAMP := $(VENV)/.launchers-installed

.PHONY: reproduce test test-fast data table bench clean-venv

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), older than the Python 3.11 that the pinned requirements need. Install 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

$(LAUNCHERS_STAMP): requirements-launchers.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-launchers.txt
	touch $(LAUNCHERS_STAMP)

# The main job: train EstiNet on real MNIST lists with the default settings. ARGS passes Hydra
# overrides, e.g. make reproduce ARGS="num_threads=1 seed=3".
ARGS ?=
reproduce: $(STAMP)
	$(PY) train_addition.py $(ARGS)

# The whole test suite, slow tests included (this is what CI runs).
test: $(LAUNCHERS_STAMP)
	$(PY) -m pytest

# Only the fast tests (seconds; synthetic data).
test-fast: $(LAUNCHERS_STAMP)
	$(PY) -m pytest -m "not slow"

# The results table: 4 models x 5 seeds with the paper preset, two jobs at a time, then the
# aggregation into results/paper/ (README, Results, has the measured wall-clock time). The sweep
# must start in a new directory, because evaluate.py pools every run below TABLE_DIR.
TABLE_DIR ?= multirun/paper
TABLE_OUT ?= results/paper
table: $(LAUNCHERS_STAMP)
	@if [ -e $(TABLE_DIR) ]; then echo "error: $(TABLE_DIR) already exists, and its runs would be pooled with the new ones. Move it away (mv $(TABLE_DIR) $(TABLE_DIR)-old) or choose another directory with 'make table TABLE_DIR=multirun/NAME'" >&2; exit 1; fi
	$(PY) train_addition.py --multirun hydra/launcher=parallel hydra.launcher.n_jobs=2 num_threads=1 \
		model=estinet,nalu,reinforce,oracle seed=0,1,2,3,4 experiment=paper hydra.sweep.dir=$(TABLE_DIR)
	$(PY) evaluate.py runs=$(TABLE_DIR) output=$(TABLE_OUT)

# Download and verify MNIST into data/MNIST/raw.
data: $(STAMP)
	$(PY) -m estinet.data --root data

# Training and k=100 evaluation throughput next to the bare extractor and a per-image DataLoader
# reference, written to docs/benchmark-results.md (minutes; docs/benchmarks.md explains it).
BENCH_THREADS ?= 1
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --threads $(BENCH_THREADS) --out docs/benchmark-results.md

clean-venv:
	rm -rf $(VENV)
