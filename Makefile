# The two commands of the project (README): `make reproduce` and `make test`.
# Both install everything they need into .venv first, from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: reproduce test test-fast bench install clean

install: $(STAMP)

# Reinstall when the dependency pins change. torch is asked for first and by its exact
# version so that pip takes the CPU wheel on this machine's disk (or the user's
# CUDA build from PyPI) instead of resolving a different release.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[pipeline,dev]'
	touch $(STAMP)

# The main job: the whole CPU reproduction through the Snakemake workflow (params.yaml),
# then its self-contained HTML report. Run again, it only does what changed.
reproduce: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH HF_HUB_OFFLINE=1 $(BIN)/snakemake
	PATH=$(CURDIR)/$(BIN):$$PATH HF_HUB_OFFLINE=1 $(BIN)/snakemake --report reports/report.html

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Developer loop: skip the slow end-to-end tests.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m 'not slow'

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/model_bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/data_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
