"""Hosts the runners' model service next to the worker, so models stay loaded across tasks.

Every task is a new process, so without help each embedding task would load its model again.
When the ``runners`` extra is installed and ``model_service`` is on, the worker starts
``python -m airflow_outpost.runners.model_service.service --persistent`` as its own child (a task cannot own it: the
worker stops whatever a finished task leaves running), points task processes at its UNIX socket
with ``OUTPOST_MODEL_SOCKET``, and stops it when the worker exits. The service releases models
idle for ``model_idle_s`` but keeps serving. The worker talks to it only through that process
boundary: nothing here imports ``runners``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path

from airflow_outpost.worker.procutil import die_with_parent

log = logging.getLogger(__name__)
SERVICE_MODULE = "airflow_outpost.runners.model_service.service"


MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux


def socket_path_for(state_folder: Path) -> Path:
    """``<state_folder>/model-service.sock`` (the state folder is 0700), or, if that is too long for a
    UNIX socket (deep state folders, e.g. under a test runner's temp directory), a socket in a new
    folder of random name that only this user can enter (``mkdtemp``: no path another user can
    take first)."""
    path = state_folder.resolve() / "model-service.sock"
    if len(str(path).encode()) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="outpost-models-")) / "model-service.sock"


def service_available() -> bool:
    """True if the runners' model service is installed in this interpreter."""
    try:
        return importlib.util.find_spec(SERVICE_MODULE) is not None
    except ModuleNotFoundError:
        return False


class ModelHost:
    """Owns one model-service process. ``start()`` and ``aclose()`` are idempotent."""

    def __init__(self, state_folder: Path, *, idle_s: float, task_uid: int | None = None,
                 shared_gid: int | None = None) -> None:
        """``task_uid``/``shared_gid``: tasks run as another user (``task_user``); the service serves
        that uid too, on a socket of the group both share, in a folder that group may enter."""
        self.socket = socket_path_for(state_folder)
        self._task_uid, self._shared_gid = task_uid, shared_gid
        self.log_path = state_folder / "model-service.log"
        self.idle_s = idle_s
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, env: dict[str, str]) -> None:
        """Start the service (it loads models lazily, on the first request for each)."""
        if self.running:
            return
        self.socket.unlink(missing_ok=True)  # a stale socket of a crashed run
        shared: list[str] = []
        if self._task_uid is not None and self._shared_gid is not None:
            shared = ["--allow-uid", str(self._task_uid), "--socket-group", str(self._shared_gid)]
            if self.socket.parent.name.startswith("outpost-models-"):  # our mkdtemp folder: pass-through
                os.chown(self.socket.parent, -1, self._shared_gid)
                self.socket.parent.chmod(0o710)
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", SERVICE_MODULE, "--persistent", "--socket", str(self.socket),
                "--idle-s", str(self.idle_s), *shared, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
        log.info("model service for tasks on %s (pid %d, idle release %.0fs)", self.socket, self._proc.pid, self.idle_s)

    async def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Wait until the service listens on its socket. Tasks started before that would find no
        service and start their own, which the worker then stops as a task leftover."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.running and loop.time() < deadline:
            if self.socket.exists():
                return True
            await asyncio.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        log.error("model service did not come up within %.0fs; tasks load models themselves:\n%s", timeout_s, tail)
        return False

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.socket.unlink(missing_ok=True)
        if self.socket.parent.name.startswith("outpost-models-"):  # our mkdtemp folder
            with contextlib.suppress(OSError):
                self.socket.parent.rmdir()
