"""The package as users install it: one import root, from a wheel and from an editable install."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import build_wheel, fresh_venv

ROOT = Path(__file__).resolve().parents[2]

# Run from an empty folder, so the repository root (and its worker/ and runners/ folders) is not
# on sys.path the way a source checkout's working directory would be.
CHECK = """
import importlib, sys
import airflow_outpost, airflow_outpost.worker, airflow_outpost.runners
import airflow_outpost.worker.runtime.worker, airflow_outpost.runners.metrics_report
for name in ("worker", "runners"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"{name} is importable as a top-level package")
print(airflow_outpost.__version__, airflow_outpost.worker.__file__)
"""


def _packages_on_disk() -> list[str]:
    found = ["airflow_outpost"]
    for top in ("worker", "runners"):
        for folder, _, files in sorted(os.walk(ROOT / top)):
            if "__init__.py" in files and "__pycache__" not in folder:
                found.append("airflow_outpost." + Path(folder).relative_to(ROOT).as_posix().replace("/", "."))
    return sorted(found)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == _packages_on_disk()


def test_editable_install_has_one_import_root(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.split()[1] == str(ROOT / "worker" / "__init__.py")  # the checkout itself, live


def test_wheel_in_a_fresh_venv_has_one_import_root_and_a_working_cli(tmp_path: Path) -> None:
    venv, site = fresh_venv(tmp_path, build_wheel(tmp_path))
    py = venv / "bin" / "python"
    names = {p.name for p in site.iterdir()}
    assert "airflow_outpost" in names and not names & {"worker", "runners"}
    assert (site / "airflow_outpost" / "py.typed").is_file()
    out = subprocess.run([str(py), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.split()[1] == str(site / "airflow_outpost" / "worker" / "__init__.py")
    for argv in ([str(venv / "bin" / "outpost"), "--help"], [str(py), "-m", "airflow_outpost", "--help"]):
        cli = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "worker" in cli.stdout and "status" in cli.stdout


@pytest.mark.parametrize("folder", ["worker", "runners", "tests", "benchmarks", "airflow_outpost"])
def test_no_code_imports_the_old_top_level_names(folder: str) -> None:
    # ruff's banned-api rule covers import statements; this covers module names in strings
    # (subprocess command lines, python -c scripts, logger names, dotted paths in settings).
    import re

    pattern = re.compile(r"""["'](?:-m )?(?:worker|runners)\.[a-z_]+""")
    allowed = {"worker.task_process", "worker.log", "worker.lock"}  # 0.1 process marker; file names
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                if m.group(0).strip("\"'").removeprefix("-m ") not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)
