"""The three distributions as users install them: one import root, path = import path, the runners alone.

``worker/`` is ``airflow-outpost-worker`` (``worker/src/airflow_outpost/worker``), ``runners/`` is
``airflow-outpost-runners`` (``runners/src/airflow_outpost/runners``), and the top-level ``pyproject.toml``
is ``airflow-outpost``, metadata only, which pulls them. ``airflow_outpost`` is a PEP 420 namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import build_wheels, fresh_venv

ROOT = Path(__file__).resolve().parents[2]
PY = Path(sys.executable)

# Run from an empty folder, so the repository root is not on sys.path the way a source checkout's
# working directory would be.
CHECK = """
import importlib, sys
import airflow_outpost, airflow_outpost.worker, airflow_outpost.runners
import airflow_outpost.worker.runtime.worker, airflow_outpost.runners.metrics_report
assert not hasattr(airflow_outpost, "__file__") or airflow_outpost.__file__ is None, "not a namespace package"
for name in ("worker", "runners"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"{name} is importable as a top-level package")
print(airflow_outpost.worker.__version__, airflow_outpost.worker.__file__, airflow_outpost.runners.__file__)
"""

# The runners without the worker or Airflow: any import of either fails, and a runner call works.
RUNNERS_ALONE = """
import sys, importlib.abc, json, pathlib, tempfile
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "airflow" or name.startswith("airflow_outpost.worker"):
            raise ImportError(f"the runners imported {name}")
sys.meta_path.insert(0, Refuse())
import airflow_outpost.runners as r
# A real runner call: the packaged model embeds a small corpus, FAISS indexes it.
d = pathlib.Path(tempfile.mkdtemp())
docs = [{"id": f"d{i}", "text": f"document {i} about topic {i % 3} and item {i}"} for i in range(30)]
(d / "docs.jsonl").write_text("\\n".join(json.dumps(doc) for doc in docs))
store = r.Store(d / "store")
emb = r.embed_corpus(d / "docs.jsonl", store=store, encoder="local")
assert emb["chunks"] == 30 and emb["embedded"] == 30, emb
idx = r.build_index(store.path("embeddings", emb["name"]), store.path("indexes", "docs"), r.IndexConfig(kind="flat"))
assert idx["count"] == 30 and idx["passed"], idx
print(r.__version__, emb["chunks"], idx["count"])
"""


def _versions() -> dict[str, str]:
    return {folder: tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]["version"]
            for folder in (".", "worker", "runners")}


def test_layout_is_path_equals_import_path() -> None:
    assert not (ROOT / "airflow_outpost").exists(), "the repository root holds an importable airflow_outpost folder"
    for folder in ("worker", "runners"):
        pkg = ROOT / folder / "src" / "airflow_outpost"
        assert not (pkg / "__init__.py").exists(), f"{pkg} must stay a PEP 420 namespace portion"
        assert (pkg / folder / "__init__.py").is_file() and (pkg / folder / "py.typed").is_file()
        # Nothing else at the namespace level except the worker's __main__.
        extra = {p.name for p in pkg.iterdir()} - {folder, "__main__.py", "__pycache__"}
        assert not extra, f"{pkg} holds {extra}"
    assert (ROOT / "worker" / "src" / "airflow_outpost" / "__main__.py").is_file()


def test_three_distributions_share_one_version_and_pin_each_other() -> None:
    versions = _versions()
    assert len(set(versions.values())) == 1, versions
    version = versions["."]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["dependencies"] == [f"airflow-outpost-worker=={version}"]
    assert meta["optional-dependencies"]["runners"] == [f"airflow-outpost-runners=={version}"]
    runners = tomllib.loads((ROOT / "runners" / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in runners}
    assert not names & {"apache-airflow", "apache-airflow-task-sdk", "airflow-outpost-worker"}, names


def test_runners_never_import_the_worker() -> None:
    # runners/pyproject.toml bans it for ruff; this proves the ban is in force for the runners' files.
    probe = ROOT / "runners" / "src" / "airflow_outpost" / "runners" / "_probe_import_worker.py"
    probe.write_text("import airflow_outpost.worker  # noqa: F401\n")
    try:
        out = subprocess.run([str(PY.with_name("ruff")), "check", "--no-cache", str(probe)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert out.returncode == 1 and "TID251" in out.stdout and "install without the worker" in out.stdout, out.stdout


def test_editable_install_has_one_import_root_and_reads_the_src_trees(tmp_path: Path) -> None:
    out = subprocess.run([str(PY), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    _, worker, runners = out.stdout.split()
    # The checkout itself, live, through plain path entries that static tools read.
    assert worker == str(ROOT / "worker" / "src" / "airflow_outpost" / "worker" / "__init__.py")
    assert runners == str(ROOT / "runners" / "src" / "airflow_outpost" / "runners" / "__init__.py")
    site = Path(subprocess.run([str(PY), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    entries = {line.strip() for pth in site.glob("__editable__*outpost*.pth") for line in pth.read_text().splitlines()}
    assert {str(ROOT / "worker" / "src"), str(ROOT / "runners" / "src")} <= entries, entries
    assert not list(site.glob("__editable__*outpost*finder.py")), "an import hook static tools cannot follow"


def test_runners_import_and_run_without_the_worker_or_airflow(tmp_path: Path) -> None:
    out = subprocess.run([str(PY), "-c", RUNNERS_ALONE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[1:] == ["30", "30"]


def test_wheels_in_a_fresh_venv_have_one_import_root_and_a_working_cli(tmp_path: Path) -> None:
    wheels = build_wheels(tmp_path)
    venv, site = fresh_venv(tmp_path, *wheels.values())
    py = venv / "bin" / "python"
    names = {p.name for p in site.iterdir()}
    assert "airflow_outpost" in names and not names & {"worker", "runners"}
    ns = site / "airflow_outpost"
    assert not (ns / "__init__.py").exists()
    assert (ns / "worker" / "py.typed").is_file() and (ns / "runners" / "py.typed").is_file()
    out = subprocess.run([str(py), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.split()[1] == str(ns / "worker" / "__init__.py")
    for argv in ([str(venv / "bin" / "outpost"), "--help"], [str(py), "-m", "airflow_outpost", "--help"]):
        cli = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "worker" in cli.stdout and "status" in cli.stdout


def test_each_wheel_holds_only_its_own_half(tmp_path: Path) -> None:
    import zipfile

    wheels = build_wheels(tmp_path)
    files = {folder: [n for n in zipfile.ZipFile(w).namelist() if ".dist-info/" not in n] for folder, w in wheels.items()}
    assert files["."] == []  # metadata only
    assert files["worker"] and all(n.startswith(("airflow_outpost/worker/", "airflow_outpost/__main__.py"))
                                   for n in files["worker"])
    assert files["runners"] and all(n.startswith("airflow_outpost/runners/") for n in files["runners"])
    assert "airflow_outpost/worker/example_dags/outpost_rag_pipeline.py" in files["worker"]


def _real_venv(tmp_path: Path, *wheels: Path) -> Path:
    """A venv that installs ``wheels`` with their real dependencies (the package index, torch first)."""
    venv = tmp_path / "venv"
    subprocess.run([str(PY), "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for args in (["torch==2.13.0"], [f"--find-links={wheels[0].parent}", *map(str, wheels)]):
        if args == ["torch==2.13.0"] and not any("runners" in w.name for w in wheels):
            continue
        done = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                              capture_output=True, text=True, timeout=1200, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
    return py


def _installed(py: Path) -> set[str]:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True, timeout=120)
    return {line.split("==")[0].lower() for line in out.stdout.splitlines()}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_runners_wheel_alone_installs_and_runs_without_airflow(tmp_path: Path) -> None:
    """What a Ray node installs: airflow-outpost-runners and its dependencies, nothing of Airflow."""
    py = _real_venv(tmp_path, build_wheels(tmp_path)["runners"])
    installed = _installed(py)
    assert "airflow-outpost-runners" in installed
    assert not installed & {"apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk", "airflow-outpost-worker"}
    out = subprocess.run([str(py), "-c", RUNNERS_ALONE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [_versions()["runners"], "30", "30"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_worker_wheel_alone_installs_without_torch_or_faiss(tmp_path: Path) -> None:
    py = _real_venv(tmp_path, build_wheels(tmp_path)["worker"])
    installed = _installed(py)
    assert "airflow-outpost-worker" in installed
    assert not installed & {"torch", "faiss-cpu", "ray", "airflow-outpost-runners", "sentence-transformers"}
    cli = subprocess.run([str(py.with_name("outpost")), "worker", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and "--api-url" in cli.stdout, cli.stderr


@pytest.mark.parametrize("folder", ["worker", "runners", "tests", "benchmarks"])
def test_no_code_imports_the_old_top_level_names(folder: str) -> None:
    # ruff's banned-api rule covers import statements; this covers module names in strings
    # (subprocess command lines, python -c scripts, logger names, dotted paths in settings).
    pattern = re.compile(r"""["'](?:-m )?(?:worker|runners)\.[a-z_]+""")
    allowed = {"worker.task_process", "worker.log", "worker.lock", "runners.md"}  # 0.1 process marker; file names
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        if "build" in path.relative_to(ROOT).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                if m.group(0).strip("\"'").removeprefix("-m ") not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_static_import_resolution_fails_on_an_unresolved_import(tmp_path: Path) -> None:
    """make typecheck's basedpyright step resolves airflow_outpost.* as an editor does, and would fail."""
    pyright = shutil.which("basedpyright", path=str(PY.parent))
    assert pyright, "basedpyright is not installed (the dev extra installs it)"
    probe = ROOT / "worker" / "src" / "airflow_outpost" / "worker" / "_probe_unresolved.py"
    probe.write_text("import airflow_outpost.runners.index.build\nimport airflow_outpost.runners.no_such_module\n")
    try:
        out = subprocess.run([pyright, "--pythonpath", str(PY), "--level", "error", str(probe)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    assert out.returncode == 1, out.stdout
    assert '"airflow_outpost.runners.no_such_module" could not be resolved' in out.stdout
    assert '"airflow_outpost.runners.index.build"' not in out.stdout


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_non_editable_install_started_from_the_repository_root_runs_the_core_dags(control_plane, start_worker,
                                                                                     tmp_path: Path) -> None:
    """The wheels, not the checkout, with the repository root as the worker's working directory (which
    the zygote's ``python -m`` puts first on sys.path): nothing there may shadow the installed package."""
    venv, site = fresh_venv(tmp_path, *build_wheels(tmp_path).values())
    py = venv / "bin" / "python"
    w = start_worker(queues="q_chain,q_mapped", concurrency=4, python=str(py), cwd=ROOT)
    runs = {}
    for dag_id in ("outpost_chain", "outpost_mapped"):
        runs[dag_id] = run_id = control_plane.trigger(dag_id)
        state = control_plane.wait_for_run(dag_id, run_id, timeout_s=300)
        assert state == "success", (control_plane.task_states(dag_id, run_id), w.log()[-3000:])
    assert control_plane.xcom("outpost_chain", runs["outpost_chain"], "describe") == "outpost:40"
    assert control_plane.xcom("outpost_mapped", runs["outpost_mapped"], "total") == sum(x * x for x in range(36))
    # The worker is the fresh venv's interpreter, whose only airflow_outpost is the wheels' (fresh_venv).
    assert w.proc is not None and Path(f"/proc/{w.proc.pid}/cmdline").read_text().startswith(str(py))
