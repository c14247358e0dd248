# Two entry points (see README): `make study` runs the whole study, `make test` runs the tests.
# Both create or refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data/all-taleqani
CONFIG ?= configs/cpu.toml

.PHONY: setup test study lint

setup:
	bash scripts/setup.sh "$(PYTHON)" "$(VENV)"

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check featsvm tests benchmarks

study: setup
	$(VENV)/bin/featsvm run $(CONFIG) --data $(DATA)
