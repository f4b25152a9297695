# recsketch: `make demo` runs the pipeline on the demo catalogue, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := demo-data
DEMO_PORT ?= 8765
AIRFLOW_PORT ?= 8080
AIRFLOW_ENV := AIRFLOW_HOME=$(CURDIR)/.airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins AIRFLOW__CORE__LOAD_EXAMPLES=False \
	PATH=$(CURDIR)/$(BIN):$$PATH

.PHONY: venv demo airflow airflow-clean test faults bench lint lock clean

venv: $(STAMP)

# torch==2.13.0 comes from pip's find-links (CPU wheel); the pinned lock is installed first, then
# recsketch itself, editable, without resolving its (already satisfied) dependencies again.
# pip's "Location ... is ignored" warnings (find-links folders this machine's pip config names but
# lacks) are dropped; anything else pip says, and its exit status, come through.
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing requirements.txt into $(VENV) (a few minutes the first time)"
	@set -o pipefail; $(BIN)/pip install -q --disable-pip-version-check -r requirements.txt $(QUIET_PIP)
	@set -o pipefail; $(BIN)/pip install -q --disable-pip-version-check --no-deps -e . $(QUIET_PIP)
	@touch $(STAMP)

lock:
	uv pip compile requirements.in --python-version 3.11 --quiet | $(PYTHON) tools/strip_gpu_pins.py > requirements.txt

demo: venv
	@rm -rf $(DEMO_DIR) && mkdir -p .airflow $(DEMO_DIR)
	@$(BIN)/recsketch demo-catalog $(DEMO_DIR)/catalog
	@$(AIRFLOW_ENV) $(BIN)/airflow db migrate > .airflow/migrate.log 2>&1 || (cat .airflow/migrate.log; exit 1)
	@set -e; $(BIN)/recsketch serve-sketchfab $(DEMO_DIR)/catalog --port $(DEMO_PORT) > $(DEMO_DIR)/server.log 2>&1 & \
	server=$$!; trap "kill $$server" EXIT; \
	for i in $$(seq 50); do curl -sf -o /dev/null http://127.0.0.1:$(DEMO_PORT)/v3/models?count=1 && break; \
	    kill -0 $$server 2>/dev/null || { cat $(DEMO_DIR)/server.log; exit 1; }; sleep 0.2; done; \
	echo "local Sketchfab API on http://127.0.0.1:$(DEMO_PORT); running the DAGs recsketch (crawl) and recsketch_recommendations with airflow dags test ..."; \
	export RECSKETCH_SKETCHFAB_URL=http://127.0.0.1:$(DEMO_PORT) RECSKETCH_DATA_DIR=$(CURDIR)/$(DEMO_DIR)/data \
	       RECSKETCH_BACKBONE=efficientnet_lite0; \
	for dag in recsketch recsketch_recommendations; do \
	    $(AIRFLOW_ENV) $(BIN)/airflow dags test $$dag >> $(DEMO_DIR)/dags-test.log 2>&1 \
	        || { grep -E "ERROR|Error|recsketch" $(DEMO_DIR)/dags-test.log | tail -40; exit 1; }; done; \
	echo; $(BIN)/python -m tools.demo_report $(DEMO_DIR)/dags-test.log; \
	echo "task logs: $(DEMO_DIR)/dags-test.log"; \
	mid=$$($(BIN)/python -c "import json; print(next(iter(json.load(open('$(DEMO_DIR)/catalog/groups.json')))))"); \
	echo; echo "query what the run loaded (from this folder):"; \
	echo "  RECSKETCH_DATA_DIR=$(DEMO_DIR)/data $(BIN)/recsketch similar $$mid --top-k 3"; \
	echo "  RECSKETCH_DATA_DIR=$(DEMO_DIR)/data $(BIN)/recsketch similar $$mid --method hybrid --json"; \
	echo "  RECSKETCH_DATA_DIR=$(DEMO_DIR)/data $(BIN)/recsketch show --models 6 --top-k 3"; \
	echo; echo "$$ RECSKETCH_DATA_DIR=$(DEMO_DIR)/data $(BIN)/recsketch similar $$mid --top-k 3"; \
	RECSKETCH_DATA_DIR=$(DEMO_DIR)/data $(BIN)/recsketch similar $$mid --top-k 3

# a real local Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, PostgreSQL
# metadata) with dags/ and plugins/, crawling the demo catalogue served on DEMO_PORT. Ctrl-C stops it.
airflow: venv
	@mkdir -p .airflow $(DEMO_DIR) && test -d $(DEMO_DIR)/catalog || $(BIN)/recsketch demo-catalog $(DEMO_DIR)/catalog
	@$(BIN)/recsketch serve-sketchfab $(DEMO_DIR)/catalog --port $(DEMO_PORT) > $(DEMO_DIR)/server.log 2>&1 & \
	server=$$!; trap "kill $$server" EXIT; \
	RECSKETCH_DATA_DIR=$(CURDIR)/$(DEMO_DIR)/airflow-data $(BIN)/python -m tools.local_airflow \
	    --port $(AIRFLOW_PORT) --sketchfab-url http://127.0.0.1:$(DEMO_PORT)

# the local Airflow's run history and task logs past KEEP_DAYS (30), as the stack's airflow-maintenance does
airflow-clean: venv
	$(BIN)/python -m tools.local_airflow --maintenance --keep-days $(or $(KEEP_DAYS),30)

# -rs: every skipped test is listed with its reason (.ci/run installs or starts what they need)
test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -rs

# the long fault suite (~45 min): 20 seeded SIGKILLs per stage, PostgreSQL stopped and
# unreachable, a full disk, 2-minute API outages per fault mode, 50 clients for 60 s, 30
# replayed days of changes each checked against a fresh full run.
# `make test` runs the short variants of the same code.
faults: venv
	$(BIN)/python -m tests.fault_suite --kills 20
	RECSKETCH_REPLAY_DAYS=30 $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_replay.py
	RECSKETCH_TEST_OUTAGE_S=120 $(BIN)/pytest -q -p no:cacheprovider tests/faults/test_service_faults.py
	$(BIN)/python -m tests.load_suite --clients 50 --seconds 60

# speed goals, measured against the naive baseline in the same run (never asserted in tests)
bench: venv
	$(BIN)/python -m benchmarks.crawl_bench
	$(BIN)/python -m benchmarks.extract_bench
	$(BIN)/python -m benchmarks.similarity_bench
	$(BIN)/python -m benchmarks.load_bench
	$(BIN)/python -m benchmarks.storage_bench
	$(BIN)/python -m benchmarks.scale_bench
	$(BIN)/python -m benchmarks.daily_bench
	$(BIN)/python -m benchmarks.dag_bench
	$(BIN)/python -m benchmarks.evaluate_bench
	$(BIN)/python -m benchmarks.months_bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(DEMO_DIR) .airflow .pytest_cache
