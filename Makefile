# Set-up and everyday commands. Everything lands in ./.venv; nothing is installed globally.
#   make demo   - set up, then run the end-to-end demo (local control plane + worker + example DAG)
#   make test   - set up, lint (ruff), type-check (mypy), then run the default test suite (what CI runs)
PYTHON     ?= python3
VENV       ?= .venv
# CPU-only torch first: a plain `torch` requirement would pull several GB of CUDA packages.
# On a machine without a local CPU wheel, add the CPU index:
#   make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" setup
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS    ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo lint typecheck test test-all test-slow bench-dispatch clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[runners,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/outpost demo

# Lint and import order (ruff), then types (mypy). mypy reads build/typecheck, a link tree that lays
# worker/ and runners/ out as the airflow_outpost package they install as.
lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/airflow_outpost
	for f in __init__.py __main__.py py.typed; do ln -s ../../../airflow_outpost/$$f build/typecheck/airflow_outpost/$$f; done
	ln -s ../../../worker build/typecheck/airflow_outpost/worker
	ln -s ../../../runners build/typecheck/airflow_outpost/runners
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench-dispatch: setup
	$(PY) benchmarks/bench_dispatch.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
