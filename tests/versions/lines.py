"""Control planes of other Airflow lines, each in its own venv made once under ``build/lines/``.

A line's venv holds that line's stock Airflow (the control plane) with the edge3 release it
supports, and this checkout installed into it (editable) against exactly what Airflow pinned
there, as a worker host of that line installs outpost. The venv is rebuilt when its spec or
``pyproject.toml`` or ``worker/pyproject.toml`` changes (the ``ready`` stamp holds both).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

LINES_DIR = REPO / "build" / "lines"
# What a line's venv installs from this checkout: the worker distribution (its pins decide the Task SDK).
PYPROJECTS = ("pyproject.toml", "worker/pyproject.toml")

# What each line's control plane needs (README's version table says the same).
LINES: dict[str, list[str]] = {
    # edge3 3.4.0 is the newest that 3.1.8 runs as installed: from 3.5.0 on, a 3.1 `db migrate` does not
    # create edge3's tables, the API server's plugin creates them unversioned, and the scheduler then
    # replays edge3's migrations over them (KeyError 'jobs_failed').
    "3.1": ["apache-airflow==3.1.8", "apache-airflow-providers-edge3==3.4.0"],
    # Today's newest cadwyn/fastapi break 3.2.2's API server (a pydantic discriminator error).
    "3.2": ["apache-airflow==3.2.2", "apache-airflow-providers-edge3==5.1.0", "cadwyn==7.0.0", "fastapi==0.136.3"],
}


def _stamp(line: str) -> str:
    digest = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in PYPROJECTS)).hexdigest()
    return json.dumps({"spec": LINES[line], "pyproject": digest, "python": sys.version.split()[0]})


def line_python(line: str) -> Path:
    """The interpreter of ``line``'s venv, built first if missing or stale (minutes, once)."""
    home = LINES_DIR / line
    venv, ready = home / "venv", home / "ready"
    py = venv / "bin" / "python"
    if ready.exists() and ready.read_text() == _stamp(line) and py.exists():
        return py
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)

    def pip(*args: str) -> None:
        done = subprocess.run([str(py), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stderr[-4000:]}"

    pip("install", *LINES[line])
    frozen = home / "airflow-pins.txt"
    frozen.write_text(subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True,
                                     check=True).stdout)
    # Against the line's own pins: fails if pyproject does not allow this line's Task SDK.
    pip("install", "-c", str(frozen), "-e", str(REPO / "worker"))
    ready.write_text(_stamp(line))
    return py
