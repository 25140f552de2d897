# Two set-up commands do everything on a fresh machine:
#   make serve   -> creates .venv, installs the project, serves the embedded default model
#   make test    -> creates .venv, installs the project with test tools, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; set TORCH_CONSTRAINT= (empty) on a GPU machine to let pip pick a CUDA build.
TORCH_CONSTRAINT ?= -c constraints-cpu.txt

.PHONY: install install-dev serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e '.[dev]'

serve: install
	$(BIN)/infinity-serve serve

test: install-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python -m tests.bench.perf_bench && $(BIN)/python -m tests.bench.server_bench

clean:
	rm -rf $(VENV) .pytest_cache
