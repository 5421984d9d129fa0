"""Starts and stops task processes: one OS process per task, each running the Task SDK.

:class:`TaskLauncher` keeps ``prewarm`` idle task processes ready (``python -m
worker.task_process`` that already imported the Task SDK), so a fetched job starts in
milliseconds instead of paying the interpreter and import start-up. Each task process is its
own session/process group, so stopping a task reaches everything it forked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Secrets that authenticate the *worker*; a task process must never see them.
_WORKER_ONLY_ENV = ("OUTPOST_JWT_SECRET", "AIRFLOW__API_AUTH__JWT_SECRET", "OUTPOST_JWT_SECRET_FILE")
OUTPUT_TAIL_BYTES = 8192


@dataclass
class TaskProcess:
    """A running task process. ``output`` holds the supervisor's own stdout/stderr."""

    proc: asyncio.subprocess.Process
    output: Path
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        return await self.proc.wait()

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the supervisor (or its whole process group). Safe if it already exited."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def kill_task_tree(self) -> None:
        """SIGKILL everything below the supervisor (the task and what it forked).

        The supervisor itself survives to report the task failed; ``signal(SIGKILL, group=True)``
        finishes it off if it lingers.
        """
        import psutil

        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def output_tail(self) -> str:
        try:
            with open(self.output, "rb") as fh:
                fh.seek(max(0, self.output.stat().st_size - OUTPUT_TAIL_BYTES))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class TaskLauncher:
    """Launches task processes; keeps ``prewarm`` spares. ``aclose()`` is safe twice."""

    def __init__(self, *, env: dict[str, str], output_dir: Path, prewarm: int = 1) -> None:
        self._env = {k: v for k, v in env.items() if k not in _WORKER_ONLY_ENV}
        self._env["OUTPOST_PARENT_PID"] = str(os.getpid())
        self._output_dir = output_dir
        self._prewarm = prewarm
        self._spares: list[TaskProcess] = []
        self._refill: asyncio.Task[None] | None = None
        self._closed = False

    async def _spawn(self) -> TaskProcess:
        self._output_dir.mkdir(parents=True, exist_ok=True)
        output = self._output_dir / f"task-{uuid.uuid4().hex[:12]}.out"
        with open(output, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker.task_process",
                stdin=asyncio.subprocess.PIPE, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=self._env, start_new_session=True,
            )
        return TaskProcess(proc=proc, output=output)

    async def start(self) -> None:
        """Start the spares (does not wait for their imports to finish)."""
        await self._fill()

    async def _fill(self) -> None:
        while not self._closed and len(self._spares) < self._prewarm:
            self._spares.append(await self._spawn())

    async def launch(self, workload: dict, server: str, env: dict[str, str] | None = None) -> TaskProcess:
        """Hand ``workload`` to a task process and return it (running). Replenishes spares."""
        tp = None
        while self._spares:
            candidate = self._spares.pop(0)
            if candidate.proc.returncode is None:
                tp = candidate
                break
            log.warning("pre-warmed task process %d died (rc=%s): %s", candidate.pid,
                        candidate.proc.returncode, candidate.output_tail()[-500:])
            candidate.output.unlink(missing_ok=True)
        if tp is None:
            tp = await self._spawn()
        assert tp.proc.stdin is not None
        msg = json.dumps({"workload": workload, "server": server, "env": env or {}}) + "\n"
        try:
            tp.proc.stdin.write(msg.encode())
            await tp.proc.stdin.drain()
            tp.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died; the caller sees the exit code and reports the job failed
        tp.started = asyncio.get_running_loop().time()
        if self._prewarm and (self._refill is None or self._refill.done()):
            self._refill = asyncio.create_task(self._fill())
        return tp

    async def aclose(self) -> None:
        """Stop the idle spares (EOF on stdin, then kill if needed)."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        spares, self._spares = self._spares, []
        for tp in spares:
            if tp.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    tp.proc.stdin.close()
        for tp in spares:
            try:
                await asyncio.wait_for(tp.wait(), 5)
            except asyncio.TimeoutError:
                tp.signal(signal.SIGKILL, group=True)
                await tp.wait()
            tp.output.unlink(missing_ok=True)
