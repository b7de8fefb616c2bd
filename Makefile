# The two commands of the README: `make up` (install, then run the default topology) and
# `make test` (install, then the whole test suite). Everything else is a helper.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ruyiflow-installed

.PHONY: install up generate test lint proto bench

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) ./scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/ruyiflow up --demo

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto: install
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/ruyiflow bench engine
