# The two commands: `make test` and `make demo`. Each sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BQ_VENV ?= .venv-bq
IOT_VENV ?= .venv-iot
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BQ_STAMP := $(BQ_VENV)/.installed
IOT_STAMP := $(IOT_VENV)/.installed
# DuckDB looks for extensions under $HOME; the local BigQuery gets a HOME of its own.
BQ_HOME := $(BQ_VENV)/home
DUCKDB_VERSION := 1.5.5

.PHONY: setup system test test-fast typecheck lint bench demo clean

setup: system $(STAMP) $(BQ_STAMP) $(IOT_STAMP)

system:
	@bash scripts/ensure-system.sh

$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the project into $(VENV) (first run: 2-3 minutes)"
	@$(BIN)/pip install -qq --disable-pip-version-check -c requirements/lock.txt -e '.[dev]'
	@touch $@

$(BQ_STAMP): requirements/bq-emulator.txt requirements/bq-emulator.lock.txt
	@test -x $(BQ_VENV)/bin/python || $(PYTHON) -m venv $(BQ_VENV)
	@echo "installing the local BigQuery into $(BQ_VENV)"
	@$(BQ_VENV)/bin/pip install -qq --disable-pip-version-check -c requirements/bq-emulator.lock.txt -r requirements/bq-emulator.txt
	@mkdir -p $(BQ_HOME)/.duckdb/extensions/v$(DUCKDB_VERSION)/linux_amd64
	@cp $$($(BQ_VENV)/bin/python -c 'import duckdb_extension_spatial, pathlib; print(next(pathlib.Path(duckdb_extension_spatial.__file__).parent.glob("extensions/v*/spatial.duckdb_extension")))') \
	    $(BQ_HOME)/.duckdb/extensions/v$(DUCKDB_VERSION)/linux_amd64/
	@touch $@

# Google's generated IoT Core client (google-cloud-iot) needs protobuf < 5, which Beam's lock cannot hold: the
# admin API's contract test drives it from its own virtual environment (.venv-iot).
$(IOT_STAMP): requirements/iot-client.txt requirements/iot-client.lock.txt
	@test -x $(IOT_VENV)/bin/python || $(PYTHON) -m venv $(IOT_VENV)
	@echo "installing Google's IoT Core client into $(IOT_VENV)"
	@$(IOT_VENV)/bin/pip install -qq --disable-pip-version-check -c requirements/iot-client.lock.txt -r requirements/iot-client.txt
	@touch $@

typecheck: $(STAMP)
	$(BIN)/pyright

lint: $(STAMP)
	$(BIN)/ruff check .

test: setup typecheck lint
	$(BIN)/pytest

# Unit tiers only, for a quick loop while developing: no emulator, broker or local BigQuery, no fresh virtualenv,
# no pyright or ruff.
test-fast: $(STAMP)
	@echo "test-fast leaves out the emulator tier (tests that start the Pub/Sub, Firestore and Bigtable emulators," \
	      "Mosquitto or the local BigQuery), the installed-package test (a fresh virtualenv; pytest counts them as" \
	      "deselected), pyright and ruff: make test runs everything"
	$(BIN)/pytest -m "not emulator and not installed"

bench: setup
	$(BIN)/python -m bench

# The whole architecture on this machine; writes demo-report.json and demo-plot.png, leaves no process behind.
demo: setup
	$(BIN)/python -m iotbridge.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(BQ_VENV) $(IOT_VENV) .pytest_cache .ruff_cache
