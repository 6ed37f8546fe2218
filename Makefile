# The two commands of the README: `make run` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast bench clean

setup:
	@VENV=$(VENV) scripts/setup.sh

run: setup
	$(PY) run_sim.py run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(PY) benchmarks/engine_vs_plain.py

clean:
	rm -rf $(VENV) results .pytest_cache
