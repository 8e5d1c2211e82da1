# `make demo` and `make test` each build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test compile check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first run: a few minutes) ..."
	$(BIN)/python -m pip install -qq -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardsync demo

test: $(STAMP)
	$(BIN)/python -m pytest --hypothesis-show-statistics

compile: $(STAMP)
	$(BIN)/shardsync compile --all

check: $(STAMP)
	$(BIN)/shardsync compile --all --check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
