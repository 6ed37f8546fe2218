# The two commands of the README: `make run` and `make test`. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast lint bench bench-scale bench-startup bench-timeline bench-all mutation leaderboard clean

setup:
	@VENV=$(VENV) scripts/setup.sh

run: setup
	$(PY) run_sim.py run $(ARGS)

# Two workers, each test file on one (its module fixtures -- clusters, reference runs -- are built once);
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: setup  # ruff (lint + format) and mypy, as configured in pyproject.toml; CI runs it before the tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

bench: setup
	$(PY) benchmarks/engine_vs_plain.py $(ARGS)

bench-scale: setup  # FedAvg at 100 / 1,000 / 10,000 clients: rounds/s, updates/s, peak RSS
	$(PY) benchmarks/scale.py $(ARGS)

bench-startup: setup  # seconds from `run_sim.py run` to the first client update
	$(PY) benchmarks/startup.py $(ARGS)

bench-timeline: setup  # where a 10,000-client FedAvg round goes, from Ray's task timeline (per task kind, per actor)
	$(PY) benchmarks/round_timeline.py $(ARGS)

bench-all: bench bench-scale bench-startup bench-timeline

MUTMUT ?= mutmut==3.8.1
mutation: setup  # mutmut over the aggregation, baselines, DSD and checkpoints with the fast tests (by hand, not in CI; ARGS="--target aggregation")
	@[ -x $(VENV)/bin/mutmut ] || $(VENV)/bin/pip install -q --disable-pip-version-check "$(MUTMUT)"
	$(PY) scripts/mutation.py $(ARGS)

# The README's benchmark table: every baseline tuned on validation (shared lr x momentum, 2-round
# search on seed 0), WarmFed at its defaults (untuned: a search would cost hours of CPU), then 3 seeds
# of configs/benchmark.yaml; report under results/tunes/leaderboard/.
LEADERBOARD_ALGORITHMS := [fedavg, fedprox, scaffold, moon, fedavg-ft, fedbabu, per-fedavg, pfedme, ditto, apfl, \
    fedper, fedrep, lg-fedavg, fedbn, fedrod, fedala, local, warmfed]
leaderboard: setup
	$(PY) run_sim.py tune --config configs/benchmark.yaml --grid train.lr=0.01,0.05 --grid train.momentum=0.9,0 \
	    --shared-only --search-rounds 2 --search-seeds 0 --name leaderboard \
	    --set 'algorithms=$(LEADERBOARD_ALGORITHMS)' --untuned warmfed $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache
