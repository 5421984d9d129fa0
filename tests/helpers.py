"""Paths and install steps the tests share. Processes and fakes live in :mod:`airflow_outpost.worker.testing`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "tests" / "dags"
DOCS = REPO / "docs" / "pages"


def doc_files() -> list[Path]:
    """README.md (the front page) and every page of the docs site: where snippets a user types live."""
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


# The three distributions, by folder: the worker, the runners, and the package users install.
DISTRIBUTIONS = {"worker": "airflow_outpost_worker", "runners": "airflow_outpost_runners", ".": "airflow_outpost"}


def build_wheels(tmp: Path) -> dict[str, Path]:
    """Build the three wheels from a copy of what the images copy (so no build/ folder of an earlier
    build in the checkout, which setuptools reuses, can slip a removed module into one); returns the
    wheel of each, keyed ``worker``, ``runners`` and ``.`` (``airflow-outpost``, metadata only)."""
    src = tmp / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    for folder in ("worker", "runners"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheels = tmp / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), *(str(src / folder) for folder in DISTRIBUTIONS)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    built = {}
    for folder, stem in DISTRIBUTIONS.items():
        [built[folder]] = wheels.glob(f"{stem}-*.whl")
    return built


def fresh_venv(tmp: Path, *wheels: Path) -> tuple[Path, Path]:
    """A new venv with ``wheels`` installed; returns (venv, its site-packages).

    The dependencies come from this interpreter's site-packages through a plain path entry,
    which adds their folder but does not run the .pth files in it (so not this checkout's
    editable finder): what is importable from the project is the wheel's content only.
    """
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", *map(str, wheels)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv, site
