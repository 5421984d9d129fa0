"""Run the stock ``airflow edge worker`` against a :class:`ControlPlane`: the baseline that tests
compare the outpost worker with (same control plane, same DAGs, its own log folder)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from airflow_outpost.worker.procutil import die_with_parent
from airflow_outpost.worker.testing.controlplane import ControlPlane, airflow_bin


class StockWorkerProc:
    """``airflow edge worker -q QUEUES -c N`` with the control plane's environment; ``stop()`` ends it.

    ``poll_s``: its ``[edge] job_poll_interval`` (the default 5 s makes a test wait for nothing)."""

    def __init__(self, cp: ControlPlane, tmp: Path, *, queues: str, concurrency: int = 4, poll_s: int = 1) -> None:
        self.cp = cp
        self.name = f"stock-{uuid.uuid4().hex[:8]}"
        self.log_folder = tmp / f"{self.name}-logs"
        self.output = tmp / f"{self.name}.out"
        self.argv = [airflow_bin(cp.python), "edge", "worker", "-q", queues, "-c", str(concurrency),
                     "--edge-hostname", self.name, "--pid", str(tmp / f"{self.name}.pid")]
        self.env = {**cp.env, "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.log_folder),
                    "AIRFLOW__EDGE__JOB_POLL_INTERVAL": str(poll_s)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> StockWorkerProc:
        """Start it and wait until the control plane lists it."""
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the stock worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(Exception):
                if self.name in self.cp.workers():
                    return self
            time.sleep(1)
        raise AssertionError(f"the stock worker did not register within {timeout_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self, timeout_s: float = 120) -> None:
        """SIGTERM to its process group (its task processes too); SIGKILL after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
