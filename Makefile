# The two commands in the README: `make demo` and `make test`. Both set up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m twinflow demo

test: setup
	$(PY) -m pytest tests -q

test-fast: setup
	$(PY) -m pytest tests -q -m "not integration"

clean:
	rm -rf runs outputs .pytest_cache
