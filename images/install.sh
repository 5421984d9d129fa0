#!/bin/sh
# The install steps of the outpost images, run by images/*/Dockerfile and, in a fresh venv,
# by tests/deploy/test_images.py (so what the images run is what the tests ran).
#
#   images/install.sh cpu|cuda [PROJECT_DIR]
#
# Installs into the python on PATH (the image's venv): first torch, pinned, from the variant's
# wheel index (CPU-only wheels for cpu, CUDA wheels for cuda; otherwise sentence-transformers
# would pull the multi-GB CUDA build onto CPU machines), then the project with the runners extra
# under images/constraints.txt. Environment:
#   TORCH_VERSION    torch release (default 2.13.0)
#   TORCH_CUDA       CUDA wheel flavour for the cuda variant (default cu128)
#   TORCH_INDEX_URL  wheel index for torch; empty = pip's configured index (mirrors, tests)
set -eu

variant="${1:?usage: install.sh cpu|cuda [PROJECT_DIR]}"
project="${2:-.}"
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
python -m pip install --constraint "$here/constraints.txt" "${project}[runners]"
python -m pip check
outpost --help > /dev/null
python -c "import prometheus_client, sentence_transformers, faiss, airflow_outpost.worker.runtime, airflow_outpost.runners.metrics_report"
echo "install.sh: outpost installed ($variant, torch $torch_version)"
