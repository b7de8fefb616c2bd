# The two commands of the README: `make up` (install, then run the default topology) and
# `make test` (install, then the whole test suite). Everything else is a helper.
# `python -P`: the repository root is not put first on sys.path, so its top-level folders
# (kernels/, router/, ...) never shadow installed packages of the same name. Two to four
# pytest-xdist workers: the suite is CPU-bound, 8.0 -> 6.7 min on 2 cores.
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
	TRITON_INTERPRET=1 $(BIN)/python -P -m pytest -q -n auto --maxprocesses 4 --dist worksteal tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto: install
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/ruyiflow bench engine
