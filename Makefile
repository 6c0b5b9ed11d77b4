# The two commands in the README: `make demo` and `make test`. Both set up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint mutate clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m twinflow demo

LINTED := platform tests benchmarks scripts

# Lint and format check first (seconds), then the suite.
test: setup lint
	$(PY) -m pytest tests -q

lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test-fast: setup
	$(PY) -m pytest tests -q -m "not integration"

# Mutation check of the core (method, checkpoint restore, planner, serving engine); slow, not part of
# `make test`. Prints every mutant the unit tests did not catch. docs/testing.md has the last result.
mutate: setup
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf runs outputs .pytest_cache
