# Paceline. `make run` brings up a local stack; `make test` runs every test.
.PHONY: all install services migrate lint test unit run bench chaos up down clean

# The project's own uv, Python from this machine (never downloaded), one lock file.
UV := $(shell bash deploy/ensure-uv.sh)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3
RUN := $(UV) run --frozen

all: lint test

install:
	$(UV) sync --all-packages --frozen

services:
	bash deploy/ensure-services.sh

migrate: install services
	$(RUN) paceline-scheduler migrate
	$(RUN) paceline-reporting migrate

lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy libs/contracts/src libs/engine/src libs/infra/src libs/starts/src services/scheduler/src \
		services/activity-worker/src services/reporting/src services/admin/src \
		clients/cli/src

# Integration tests mostly wait on real processes: a few files run side by side (each file on
# one worker, so a file's stacks and private services stay together). TEST_WORKERS=0: in series.
TEST_WORKERS ?= 3
test: install services
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

unit: install
	$(RUN) pytest tests/unit $(PYTEST_ARGS)

# run_stack.py checks every setting before it migrates or starts anything.
run: install services
	$(RUN) python deploy/run_stack.py $(RUN_ARGS)

# Throughput, failover and scaling on this machine, one JSON object a line; e.g. BENCH_ARGS="--kills 5".
bench: install services
	$(RUN) python deploy/bench.py $(BENCH_ARGS)

# The long randomized failure run; e.g. make chaos CHAOS_ARGS="--faults 200 --seed 7".
chaos: install services
	$(RUN) python deploy/chaos.py $(CHAOS_ARGS)

# The stack in containers, with Grafana, Tempo, Loki, Prometheus and a collector
# (deploy/compose/, docs/observability.md); a clear error where no container engine answers.
# make down keeps the data; make down DOWN_ARGS=--volumes deletes it.
up:
	bash deploy/compose/up.sh $(UP_ARGS)

down:
	bash deploy/compose/down.sh $(DOWN_ARGS)

clean:
	rm -rf .paceline .venv
