#!/bin/sh
# The install steps of the outpost images, run by images/*/Dockerfile and, in a fresh venv,
# by tests/deploy/test_images.py (so what the images run is what the tests ran).
#
#   images/install.sh cpu|cuda [PROJECT_DIR] [all|runners]
#
# Installs into the python on PATH (the image's venv): first torch, pinned, from the variant's
# wheel index (CPU-only wheels for cpu, CUDA wheels for cuda; otherwise sentence-transformers
# would pull the multi-GB CUDA build onto CPU machines), then under images/constraints.txt either
# `all` (default): the worker and runners distributions and airflow-outpost[runners] that pulls them,
# or `runners`: airflow-outpost-runners alone, for a Ray node (no Airflow, no Task SDK). Environment:
#   TORCH_VERSION    torch release (default 2.13.0)
#   TORCH_CUDA       CUDA wheel flavour for the cuda variant (default cu128)
#   TORCH_INDEX_URL  wheel index for torch; empty = pip's configured index (mirrors, tests)
set -eu

variant="${1:?usage: install.sh cpu|cuda [PROJECT_DIR]}"
project="${2:-.}"
what="${3:-all}"
here="$(cd "$(dirname "$0")" && pwd)"
torch_version="${TORCH_VERSION:-2.13.0}"
cuda="${TORCH_CUDA:-cu128}"

case "$variant" in
  cpu)
    torch="torch==${torch_version}+cpu"
    index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    ;;
  cuda)
    torch="torch==${torch_version}+${cuda}"
    index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/${cuda}}"
    ;;
  *)
    echo "install.sh: the variant must be cpu or cuda, not '$variant'" >&2
    exit 2
    ;;
esac

if [ -n "$index" ]; then
  # torch's own dependencies (filelock, sympy, ...) come from PyPI; the constraints pin them next.
  python -m pip install --index-url "$index" --extra-index-url https://pypi.org/simple "$torch"
else
  python -m pip install "$torch"
fi
case "$what" in
  all)
    # The two distributions from this source tree; the meta package's exact pins match them.
    python -m pip install --constraint "$here/constraints.txt" "$project/worker" "$project/runners" "${project}[runners]"
    python -m pip check
    outpost --help > /dev/null
    python -c "import prometheus_client, sentence_transformers, faiss, airflow_outpost.worker.runtime, airflow_outpost.runners.metrics_report"
    ;;
  runners)
    python -m pip install --constraint "$here/constraints.txt" "$project/runners"
    python -m pip check
    python -c "import sentence_transformers, faiss, ray, airflow_outpost.runners.metrics_report"
    if python -c "import airflow" 2>/dev/null; then
      echo "install.sh: a runners-only install must not pull Airflow" >&2
      exit 1
    fi
    ;;
  *)
    echo "install.sh: what to install must be all or runners, not '$what'" >&2
    exit 2
    ;;
esac
echo "install.sh: outpost $what installed ($variant, torch $torch_version)"
