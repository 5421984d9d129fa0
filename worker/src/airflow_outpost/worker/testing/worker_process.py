"""Run a real ``outpost worker`` process against a :class:`ControlPlane`, and the ``outpost`` CLI.

What the end-to-end tests, the fault suite and the benchmarks share: the worker runs as users run
it (``python -m airflow_outpost worker ...``), with its own state and log folders under ``tmp``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from airflow_outpost.worker.testing.controlplane import ControlPlane


class WorkerProc:
    """An ``outpost worker`` subprocess; ``stop()`` sends a signal and waits for the exit code."""

    def __init__(self, cp: ControlPlane, tmp: Path, *, queues: str, name: str | None = None,
                 concurrency: int = 2, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 state_folder: Path | None = None, dags_folder: Path | None = None, cwd: Path | None = None,
                 python: str | None = None) -> None:
        self.cp = cp
        self.cwd = cwd
        self.name = name or f"w-{uuid.uuid4().hex[:8]}"
        self.state_folder = state_folder or tmp / f"{self.name}-state"
        self.log_folder = tmp / f"{self.name}-logs"
        self.output = tmp / f"{self.name}.out"
        self.argv = [
            python or sys.executable, "-m", "airflow_outpost", "worker", "--api-url", cp.base_url, "--name", self.name,
            "--queues", queues, "--concurrency", str(concurrency), "--state-folder", str(self.state_folder),
            "--log-folder", str(self.log_folder), "--dags-folder", str(dags_folder or cp.dags_folder), "--poll-interval-s", "1",
            "--heartbeat-interval-s", "5", "--drain-timeout-s", "60", "--kill-grace-s", "5",
            *(extra_args or []),
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "AIRFLOW__"))}
        self.env.update({"OUTPOST_JWT_SECRET": cp.jwt_secret, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_registered: bool = True, timeout_s: float = 60) -> WorkerProc:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd)
        if wait_registered:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                status = self.status()
                if status and status.get("registered") and status.get("pid") == self.proc.pid:
                    return self
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
                time.sleep(0.2)
            raise AssertionError(f"worker did not register within {timeout_s}s:\n{self.log()}")
        return self

    def status(self) -> dict | None:
        try:
            return json.loads((self.state_folder / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_for_log(self, pattern: str, count: int = 1, timeout_s: float = 30) -> str:
        """Wait until the worker's output matches the regex ``pattern`` at least ``count`` times.

        The control plane learns a try's state from the task process, before the worker logs that
        the job ended, so a test that saw the run finish waits here for the worker's side.
        """
        deadline = time.monotonic() + timeout_s
        while len(re.findall(pattern, log := self.log())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not {count} times in the worker's log within {timeout_s}s:\n{log[-3000:]}")
            time.sleep(0.2)
        return log

    def wait_until(self, cond, what: str, timeout_s: float = 120) -> float:  # type: ignore[no-untyped-def]
        """Wait until ``cond()`` is true while this worker keeps running; return the seconds it took.

        Fails with the worker's log if ``what`` did not happen in ``timeout_s`` or the worker exited.
        """
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout_s, f"{what} did not happen within {timeout_s}s:\n{self.log()[-5000:]}"
            assert self.proc is not None and self.proc.poll() is None, \
                f"worker exited while waiting for {what}:\n{self.log()[-5000:]}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 120) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"worker did not exit within {timeout_s}s after {sig}:\n{self.log()[-5000:]}") from exc


def run_outpost(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``outpost`` CLI to completion (for start-up error tests), without the caller's
    ``OUTPOST_*``/``AIRFLOW__*`` environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "AIRFLOW__"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "airflow_outpost", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout_s, cwd=cwd)
