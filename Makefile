# Every target creates the virtualenv and installs the project when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck setup clean soak

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dask]'  # dask: the engine tests (issue 14)
	$(BIN)/python -m compileall -q src
	touch $(STAMP)

setup: $(STAMP)

## Run the combined demo (phase 2: client + executor threads; PHASE=1|2|3 to choose).
PHASE ?= 2
demo: $(STAMP)
	$(BIN)/cs-demo --phase $(PHASE)

## Lint, type-check and run the whole test suite.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .bench-venv

# ------------------------------------------------------------------------- benchmarks
# The peers (ray, dask, loky, matplotlib) are heavy and benchmark-only: they live in their
# own virtualenv so the dev/test environment never depends on them.
BENCH_VENV := .bench-venv
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed
## Extra arguments for benchmarks.run, e.g. BENCH_ARGS=--quick
BENCH_ARGS ?=

.PHONY: bench

$(BENCH_STAMP): pyproject.toml benchmarks/requirements.txt
	test -x $(BENCH_BIN)/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install -q --upgrade pip
	$(BENCH_BIN)/python -m pip install -q -e . -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

## Benchmark taskcs against its peers; writes benchmarks/RESULTS.md, results.json, results.png.
bench: $(BENCH_STAMP)
	@# An editable install writes no bytecode, and PYTHONDONTWRITEBYTECODE may be set: without
	@# this, every cold start would pay ~20 ms compiling taskcs's sources (measured).
	$(BENCH_BIN)/python -m compileall -q src
	BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
		$(BENCH_BIN)/python -m benchmarks.run $(BENCH_ARGS)
	BENCH_COMMAND="make bench-federation" $(BENCH_BIN)/python -m benchmarks.federation
	BENCH_COMMAND="make bench-engines" $(BENCH_BIN)/python -m benchmarks.engines

.PHONY: bench-federation
## Phase 4 only: federated servers against one phase-3 server; writes benchmarks/FEDERATION.md.
bench-federation: $(BENCH_STAMP)
	$(BENCH_BIN)/python -m compileall -q src
	BENCH_COMMAND="make bench-federation" $(BENCH_BIN)/python -m benchmarks.federation

# ------------------------------------------------------------------------------ soak
## Extra arguments for benchmarks.soak, e.g. SOAK_ARGS=--quick or SOAK_ARGS="--only bad_frames"
SOAK_ARGS ?=

## The soak suite (issue 9): executor and server kills, garbage floods, many and vanishing
## clients; writes benchmarks/SOAK.md (a few minutes on 2 cores; not part of `make test`).
soak: $(STAMP)
	SOAK_COMMAND="make soak$(if $(SOAK_ARGS), SOAK_ARGS='$(SOAK_ARGS)')" \
		$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# ---- issue 14
.PHONY: bench-engines
## Issue 14 only: taskcs over a Dask and a Ray cluster against each engine alone and phase 3; writes benchmarks/ENGINES.md.
bench-engines: $(BENCH_STAMP)
	$(BENCH_BIN)/python -m compileall -q src
	BENCH_COMMAND="make bench-engines" $(BENCH_BIN)/python -m benchmarks.engines

.PHONY: test-ray
## The Ray engine tests: Ray (~240 MB) joins .venv only here, not in `make test`'s install.
test-ray: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,dask,ray]'
	$(BIN)/python -m pytest -q tests/test_engines.py -k ray
# ---- end issue 14
