# Two set-up commands do everything on a fresh machine:
#   make serve   -> creates .venv, installs the project, serves the embedded default model
#   make test    -> creates .venv, installs the project with test tools, lints, runs the test suite
#   (make lint alone: ruff lint, ruff format check and mypy; config in pyproject.toml; ~30 s fresh)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; set TORCH_CONSTRAINT= (empty) on a GPU machine to let pip pick a CUDA build.
TORCH_CONSTRAINT ?= -c constraints-cpu.txt

.PHONY: install install-dev serve test lint bench mutate gpu-wheels gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CONSTRAINT) -e '.[dev]'

serve: install
	$(BIN)/infinity-serve serve

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q
	# the server's suite again under continuous batching (docs/serving.md#continuous-batching)
	INFINITY_BATCHING=continuous HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests/server

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every performance table, each measured within one run (ratios): the model (with ops per block and
# per-scale overhead), guidance-free late scales, the VAE decode and end to end before/after, stream
# previews, the real server, then what each batching scheduler reaches on measured step costs.
# ~27 minutes on 2 cores; docs/benchmarks.md has the latest figures.
bench: install-dev
	$(BIN)/python -m tests.bench.perf_bench
	$(BIN)/python -m tests.bench.guidance_bench
	$(BIN)/python -m tests.bench.decode_bench
	$(BIN)/python -m tests.bench.preview_bench
	$(BIN)/python -m tests.bench.server_bench
	$(BIN)/python -m tests.bench.server_bench --open-loop --requests 300
	$(BIN)/python -m tests.bench.server_bench --open-loop --shape mid --requests 60
	$(BIN)/python -m tests.bench.batching_sim --validate 300
	$(BIN)/python -m tests.bench.batching_sim --shape mid --repeats 2

# Mutation testing of model/sampler.py, model/quantizer.py and server/batcher.py: [tool.mutmut] in pyproject.toml, docs/testing.md.
# ~5 minutes on 2 cores; never part of `make test` or CI. A fresh run each time (the counts stay comparable);
# then `$(BIN)/mutmut show NAME` prints a survivor's diff. One torch thread per worker, one worker per core.
mutate: install-dev
	$(BIN)/pip install -q 'mutmut>=3.8.1,<4'
	rm -rf mutants
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/mutmut run --max-children $$(nproc)
	$(BIN)/mutmut results

# The GPU check (docs/gpu-check.md). On a machine with network: the server's packages that the bare GPU
# machine (Python 3.12, torch, transformers, safetensors, numpy, pillow, prometheus-client, httpx, pytest)
# lacks, as wheels in wheels/ (~10 MB, git-ignored), to ship beside the checkout.
WHEELS ?= wheels
SERVER_WHEELS := fastapi uvicorn pydantic pydantic-settings limits sse-starlette python-multipart
gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d $(WHEELS) $(SERVER_WHEELS)

# On the GPU machine, with its own Python (no venv, no network): install the wheels when present, then
# one table on stdout and in gpu-check.md, within 8 minutes. PIP_FLAGS=--break-system-packages if pip refuses.
GPU_PYTHON ?= python3
PIP_FLAGS ?=
gpu-check:
	if [ -d $(WHEELS) ]; then $(GPU_PYTHON) -m pip install -q $(PIP_FLAGS) --no-index --find-links $(WHEELS) $(SERVER_WHEELS); fi
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(GPU_PYTHON) -m tests.gpu.gpu_check --device cuda --out gpu-check.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
