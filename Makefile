# Two entry points (see README): `make study` runs the whole study, `make test` runs the tests.
# Both create or refresh the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data/all-taleqani
CONFIG ?= configs/cpu.toml
# Offline weights folder with a weights.toml index; empty = torchvision/timm ImageNet downloads.
WEIGHTS_DIR ?=

.PHONY: setup test study lint

setup:
	bash scripts/setup.sh "$(PYTHON)" "$(VENV)"

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check featsvm tests benchmarks

study: setup
	$(if $(WEIGHTS_DIR),FEATSVM_WEIGHTS_DIR=$(abspath $(WEIGHTS_DIR)),) $(VENV)/bin/featsvm run $(CONFIG) --data $(DATA)
