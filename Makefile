# kaiku — the two commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test chaos chromium lint format schemas bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: start everything on this machine (embedded broker, SQLite, file outbox) on :8000
run: $(STAMP)
	$(BIN)/kaiku run

## test: every test, against the real broker (started by the tests) and PostgreSQL; the fault
## tests (kill -9, a PostgreSQL restart, a paused broker) are `make chaos`, which CI runs too.
## The tests mostly wait on the broker, the database and the browser, so they run in
## TEST_WORKERS processes (each with a broker of its own; an idle one takes tests queued for
## another, so the slowest do not all end up last); TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 3
test: $(STAMP) chromium
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal --ignore=tests/faults

## chaos: the fault tests (tests/faults): services killed, PostgreSQL restarted, the broker paused
chaos: $(STAMP)
	$(BIN)/pytest tests/faults

# The page tests drive Debian's chromium through Playwright (never a downloaded browser build).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

## lint: ruff, the format check and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix services tests
	$(BIN)/ruff format services tests

## schemas: export schemas/ from the message models
schemas: $(STAMP)
	$(BIN)/kaiku schemas

## bench: throughput figures beside bare baselines measured in the same run
bench: $(STAMP)
	$(BIN)/python -m tests.bench

clean:
	rm -rf var $(VENV) .pytest_cache .mypy_cache .ruff_cache
