"""Starts and stops task processes: one OS process per task, each running the Task SDK.

:class:`TaskLauncher` keeps a *zygote* (``python -m airflow_outpost.worker.processes.task_main --zygote``) that has
already imported the Task SDK and the task runner; each task is a fork of it, so a fetched job
starts in milliseconds and a burst of jobs doesn't pay interpreter start-up and imports per task
(the stock worker gets the same effect by forking itself). With ``prewarm = 0`` every task gets a
fresh interpreter instead. Each task process is its own session/process group.

If the zygote dies, tasks it forked are reported as killed by SIGKILL (with ``crash_policy =
stop`` their parent-death signal kills the task tree and the Task SDK reports them failed; the
worker stops whatever is left of them either way) and a new zygote starts on the next launch.
With ``crash_policy = adopt`` task processes are started without a parent-death signal, so they
outlive a crashed worker (:mod:`airflow_outpost.worker.processes.task_main`);
:mod:`airflow_outpost.worker.runtime.recovery` takes them over.

Exactly once at launch: a fork that is not confirmed within ``start_timeout_s`` raises
:class:`~airflow_outpost.worker.errors.LaunchTimeoutError` (the job runner fails the job, so it is
retried elsewhere). Each request carries its deadline; a task process forked after it (a zygote that
was stopped or starved) exits before it runs anything, and one the zygote reports started after
the worker gave up on it is SIGKILLed at once, and logged.

With ``task_user`` the zygote (or each fresh interpreter) is started through ``sudo -u
<task_user>``, as Airflow's ``run_as_user`` does, so tasks run as another OS user that cannot read
the worker's files or process. The worker's own user then signals them through ``sudo`` too
(``kill`` as the task user) when the kernel refuses it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_outpost.worker.config import without_credentials
from airflow_outpost.worker.errors import LaunchTimeoutError

log = logging.getLogger(__name__)

OUTPUT_TAIL_BYTES = 8192
START_TIMEOUT_S = 120.0
# Variables sudo drops even with -E (its env_delete list) that a task's interpreter needs: passed
# on the command line instead (they are paths, not secrets).
_SUDO_DROPPED = ("PYTHONPATH", "LD_LIBRARY_PATH")


def as_task_user(user: str | None, argv: list[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` run as ``user`` through ``sudo`` (non-interactive, environment kept, ``HOME`` the
    user's), or ``argv`` itself when ``user`` is None."""
    if user is None:
        return argv
    kept = [f"{k}={env[k]}" for k in _SUDO_DROPPED if env.get(k)]
    return ["sudo", "-n", "-E", "-H", "-u", user, "--", *(["/usr/bin/env", *kept] if kept else []), *argv]


def _kill_as(user: str | None, pid: int, sig: int) -> None:
    """Signal ``pid`` as ``user`` through ``sudo`` (the worker may not signal another user's process)."""
    if user is None:
        return
    import subprocess

    subprocess.run(["sudo", "-n", "-u", user, "--", "kill", f"-{int(sig)}", str(pid)], capture_output=True, timeout=30)


class TaskProcess:
    """A running task process (the Task SDK supervisor). ``output`` holds its stdout/stderr."""

    def __init__(self, pid: int, output: Path, exit_future: asyncio.Future[int], task_user: str | None = None) -> None:
        self.pid = pid
        self.output = output
        self._exit = exit_future
        self._task_user = task_user

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        """The exit code: 0 success, >0 failure, <0 killed by that signal. Cancel-safe."""
        return await asyncio.shield(self._exit)

    def describe_exit(self, code: int) -> str:
        """How the process ended, for logs: ``exit code N``."""
        return f"exit code {code}"

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the supervisor (or its whole process group). Safe if it already exited."""
        if self._exit.done():
            return
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # a task user's process: signal it as that user
            _kill_as(self._task_user, -self.pid if group else self.pid, sig)

    def kill_task_tree(self) -> None:
        """SIGKILL everything below the supervisor (the task and what it forked).

        The supervisor itself survives to report the task failed; ``signal(SIGKILL, group=True)``
        finishes it off if it lingers.
        """
        import psutil

        if self._exit.done():
            return  # its pid may belong to another process by now
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
            except psutil.AccessDenied:
                _kill_as(self._task_user, child.pid, signal.SIGKILL)

    def reap_after_task(self) -> int:
        """Once the task runner (the supervisor's child) has exited, kill what it left behind.

        Leftovers inherit the task's output sockets, and the Task SDK supervisor waits for those
        to close (up to ``[workers] socket_cleanup_timeout``) before it reports: killing them
        lets it finish now. The runner is the supervisor's only child, and orphans are
        re-parented to the zygote, so "no child, but others in the session" means the runner is
        gone and the others are leftovers. Returns how many were killed.
        """
        import psutil

        try:
            if psutil.Process(self.pid).children():
                return 0
        except psutil.NoSuchProcess:
            return 0
        return self.kill_session(exclude=self.pid)

    def kill_session(self, exclude: int | None = None) -> int:
        """SIGKILL processes still in this task's session (left behind after it ended).

        The task process started a new session, so its session id is its pid; anything a task
        forked and left running is found by that id. Returns how many were killed.
        """
        import psutil

        # Runs after every task: one getsid() per pid, not psutil.process_iter(), whose per-process
        # reads cost ~4 ms per call on the worker's event loop with ~100 processes on the machine.
        killed = 0
        for pid in psutil.pids():
            if pid == exclude:
                continue
            try:
                if os.getsid(pid) == self.pid and _kill_if_in_session(pid, self.pid):
                    killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        return killed

    def output_tail(self) -> str:
        try:
            with open(self.output, "rb") as fh:
                fh.seek(max(0, self.output.stat().st_size - OUTPUT_TAIL_BYTES))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


def _kill_child(pid: int, parent: int) -> bool:
    """SIGKILL ``pid`` (and its process group) if it is still a child of ``parent``; True if signalled.

    Through a pidfd where the platform has one, so a pid reused since is never signalled.
    """
    import psutil

    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        fd = pidfd_open(pid) if pidfd_open is not None else None
    except OSError:
        return False
    try:
        if psutil.Process(pid).ppid() != parent:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
    finally:
        if fd is not None:
            os.close(fd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # what it forked, if it got as far as its own session
    return True


def _kill_if_in_session(pid: int, sid: int) -> bool:
    """SIGKILL ``pid``, which the caller just saw in session ``sid``; True if it was signalled.

    Through a pidfd where the platform has one: the session is checked again on the process the
    pidfd holds, so a pid reused since the caller's check is never signalled by mistake. Without
    pidfds (not Linux, or a kernel before 5.3) it is a plain kill, as psutil's was.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        os.kill(pid, signal.SIGKILL)
        return True
    try:
        fd = pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        os.kill(pid, signal.SIGKILL)  # pidfd_open unsupported by this kernel (ENOSYS) or refused
        return True
    try:
        if os.getsid(pid) != sid:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


class _Zygote:
    """One forking parent process and the bookkeeping of the tasks it forked."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.proc = proc
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.late: dict[str, float] = {}  # request id -> time.monotonic() its launch timed out
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started: dict[str, asyncio.Future[int]] = {}
        self.exits: dict[str, asyncio.Future[int]] = {}
        self.reader = asyncio.create_task(self._read(), name="zygote reader")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    msg: dict[str, Any] = json.loads(line)
                except ValueError:
                    log.warning("zygote said something unexpected: %r", line[:200])
                    continue
                event = msg.get("event")
                if event == "ready" and not self.ready.done():
                    self.ready.set_result(None)
                elif event == "started" and msg["id"] in self.late:
                    self._kill_late(msg["id"], int(msg["pid"]))
                elif event == "started" and (fut := self.started.pop(msg["id"], None)) and not fut.done():
                    fut.set_result(int(msg["pid"]))
                elif event == "exit" and (fut := self.exits.pop(msg["id"], None)) and not fut.done():
                    fut.set_result(int(msg["code"]))
        finally:
            # The zygote is gone: its children die with it (parent-death signal).
            error = RuntimeError(f"task zygote exited with {await self.proc.wait()}: {self._log_tail()}")
            if not self.ready.done():
                self.ready.set_exception(error)
            for fut in self.started.values():
                if not fut.done():
                    fut.set_exception(error)
            for fut in self.exits.values():
                if not fut.done():
                    fut.set_result(-signal.SIGKILL)
            self.started.clear()
            self.exits.clear()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def _kill_late(self, rid: str, pid: int) -> None:
        """The zygote forked ``rid`` after its launch timed out (the job is failed already): kill it."""
        late_s = time.monotonic() - self.late.pop(rid)
        self.exits.pop(rid, None)
        killed = _kill_child(pid, self.proc.pid)
        log.error("task process %d (request %s) started %.1fs after its launch timed out; its job was failed "
                  "then, so it %s", pid, rid, late_s, "was killed" if killed else "had already exited")

    async def fork(self, request: dict[str, Any]) -> tuple[int, asyncio.Future[int]]:
        # Nothing is sent before the zygote is ready: waiting for it has its own limit.
        await asyncio.wait_for(asyncio.shield(self.ready), START_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        rid = request["id"]
        started: asyncio.Future[int] = loop.create_future()
        exited: asyncio.Future[int] = loop.create_future()
        self.started[rid], self.exits[rid] = started, exited
        assert self.proc.stdin is not None
        # The task process itself refuses to run past this (same host, same clock).
        request = {**request, "deadline": time.time() + self.start_timeout_s}
        try:
            async with asyncio.timeout(self.start_timeout_s):
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                await self.proc.stdin.drain()
                pid = await started
        except TimeoutError:
            self.started.pop(rid, None)
            self.exits.pop(rid, None)
            self.late[rid] = time.monotonic()
            raise LaunchTimeoutError(
                f"the task process did not start within {self.start_timeout_s:.0f}s (the task zygote, pid "
                f"{self.proc.pid}, is stuck or overloaded); the job is failed here so its retries run it elsewhere, "
                "and a process started for it later is killed before it runs the task") from None
        return pid, exited

    async def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class TaskLauncher:
    """Launches task processes. ``start(env)`` begins warming; ``aclose()`` is safe twice.

    ``env`` is given at start, not construction: it holds the egress gateway's URL, known only once
    the gateway listens.
    """

    def __init__(self, *, output_dir: Path, prewarm: int = 1, crash_policy: str = "stop",
                 preload: tuple[str, ...] = (), memory_merge: bool = False,
                 start_timeout_s: float = START_TIMEOUT_S, task_user: str | None = None) -> None:
        self._env: dict[str, str] | None = None
        self._start_timeout_s = start_timeout_s
        self._task_user = task_user
        self._preload = preload
        self._memory_merge = memory_merge
        self._crash_policy = crash_policy
        self._output_dir = output_dir
        self._use_zygote = prewarm > 0
        self._zygote: _Zygote | None = None
        self._closed = False

    async def _spawn(self, *args: str, stdout: Any, stderr: Any) -> asyncio.subprocess.Process:
        if self._env is None:
            raise RuntimeError("TaskLauncher.start(env) was not called")
        # -P: the worker's working directory is not put on sys.path, so a json.py there cannot
        # shadow the standard library or an installed package in the zygote and every task.
        argv = as_task_user(self._task_user, [sys.executable, "-P", "-m", "airflow_outpost.worker.processes.task_main",
                                              *args], self._env)
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=stdout, stderr=stderr, env=self._env, start_new_session=True,
        )

    async def start(self, env: Mapping[str, str]) -> None:
        """Start the zygote with ``env`` (credentials removed); it imports in the background
        (does not wait for it)."""
        self._env = without_credentials(dict(env))
        self._env["OUTPOST_PARENT_PID"] = str(os.getpid())
        self._env["OUTPOST_CRASH_POLICY"] = self._crash_policy
        # Set both ways: the worker's own OUTPOST_* settings variables are inherited, and a flag or
        # config file may have overridden them.
        self._env["OUTPOST_PRELOAD"] = ",".join(self._preload)
        self._env["OUTPOST_MEMORY_MERGE"] = "1" if self._memory_merge else "0"
        self._env["OUTPOST_VIA_SUDO"] = "1" if self._task_user else "0"
        if self._use_zygote:
            await self._ensure_zygote()

    async def _ensure_zygote(self) -> _Zygote:
        if self._zygote is None or not self._zygote.alive:
            if self._zygote is not None:
                log.warning("task zygote died; starting a new one")
            self._output_dir.mkdir(parents=True, exist_ok=True)
            log_path = self._output_dir / "zygote.log"
            with open(log_path, "ab") as err:
                proc = await self._spawn("--zygote", stdout=asyncio.subprocess.PIPE, stderr=err)
            self._zygote = _Zygote(proc, log_path, self._start_timeout_s)
        return self._zygote

    async def launch(self, workload: dict, server: str, env: dict[str, str] | None = None,
                     exit_file: Path | None = None) -> TaskProcess:
        """Start ``workload`` in a new task process and return it (running).

        The task process records its exit code in ``exit_file`` (if given) when ``supervise_task``
        returns. Not idempotent: each call starts a new process.
        """
        if self._closed:
            raise RuntimeError("launcher is closed")
        self._output_dir.mkdir(parents=True, exist_ok=True)
        rid = uuid.uuid4().hex[:12]
        output = self._output_dir / f"task-{rid}.out"
        request = {"id": rid, "workload": workload, "server": server, "env": env or {}, "output": str(output),
                   "exit_file": str(exit_file) if exit_file is not None else None}
        if self._use_zygote:
            zygote = await self._ensure_zygote()
            pid, exited = await zygote.fork(request)
            return TaskProcess(pid, output, exited, self._task_user)
        with open(output, "wb") as out:
            proc = await self._spawn(stdout=out, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(request) + "\n").encode())
        await proc.stdin.drain()
        proc.stdin.close()
        return TaskProcess(proc.pid, output, asyncio.ensure_future(proc.wait()), self._task_user)

    async def aclose(self) -> None:
        """Stop the zygote (after the worker drained its tasks)."""
        self._closed = True
        if self._zygote is not None:
            zygote, self._zygote = self._zygote, None
            await zygote.close()
