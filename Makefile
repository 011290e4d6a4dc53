# The two commands of the project (README): `make reproduce` and `make test`.
# Both install everything they need into .venv first, from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: reproduce test test-fast bench install clean mlflow-ui

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

# Two pytest-xdist workers, by test file: the SLURM tests mostly wait on job states, and the
# other worker runs the rest meanwhile (tests/conftest.py orders the files; no reordering by
# size). `make test PARALLEL=` runs the suite in one process.
PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PARALLEL)

# Developer loop: skip the slow end-to-end tests.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PARALLEL) -m 'not slow'

# The MLflow UI over the project's tracking store, the one rmt.tracking writes (its
# DEFAULT_TRACKING_URI, artifacts in its ARTIFACTS_DIRECTORY), on this machine only:
# http://127.0.0.1:$(UI_PORT). Without MLflow's job runner (GenAI jobs, seven worker
# processes), which the runs, compare and model pages do not use.
UI_PORT ?= 5000
STORE = $(shell $(BIN)/python -c 'import rmt.tracking as t; print(t.DEFAULT_TRACKING_URI, t.ARTIFACTS_DIRECTORY)')

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
		--backend-store-uri $(word 1,$(STORE)) --artifacts-destination $(word 2,$(STORE))

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/model_bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/data_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
