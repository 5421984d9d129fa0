"""Run a real ``outpost scaler`` process for the tests, and read it as KEDA would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from airflow_outpost.worker.testing.controlplane import ControlPlane, free_port


def api_token(cp: ControlPlane) -> str:
    """A REST API token from the control plane's auth manager (its simple auth manager hands one out
    without credentials, since the test control plane makes everyone an admin)."""
    resp = httpx.get(f"{cp.base_url}/auth/token", timeout=30)
    resp.raise_for_status()
    return str(resp.json()["access_token"])


class ScalerProc:
    """``outpost scaler`` on a free loopback port; ``get(path)`` -> (status, body)."""

    def __init__(self, cp: ControlPlane, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.output = tmp / "scaler.out"
        self.token_file = tmp / "api-token"
        self.token_file.write_text(api_token(cp) + "\n")
        self.argv = [sys.executable, "-m", "airflow_outpost", "scaler", "--api-url", cp.base_url,
                     "--token-file", str(self.token_file), "--port", str(self.port), *extra]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "AIRFLOW__"))}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> ScalerProc:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"scaler exited with {self.proc.returncode}: {self.log()}")
            try:
                httpx.get(self.url + "/metrics", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"scaler did not listen within {timeout_s}s: {self.log()}")

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def get(self, path: str) -> tuple[int, Any]:
        resp = httpx.get(self.url + path, timeout=30)
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.text
        return resp.status_code, body

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        return self.proc.wait(30)
