"""What is left of a task after it ended: its session's processes are found and killed, and
nothing outside that session is touched."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from airflow_outpost.worker.processes import launcher
from airflow_outpost.worker.processes.launcher import TaskProcess

# A session leader (as each task's supervisor is) that starts a child in its session, says its pid
# on stdout, then waits.
LEADER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":  # killed, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_kill_session_kills_the_task_s_leftovers_and_nothing_else(tmp_path: Path) -> None:
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, start_new_session=True)
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    loop = asyncio.new_event_loop()
    try:
        assert leader.stdout is not None
        child = int(leader.stdout.readline())
        proc = TaskProcess(leader.pid, tmp_path / "out", loop.create_future())
        assert proc.kill_session(exclude=leader.pid) == 1  # the leftover child only
        assert _gone(child)
        assert leader.poll() is None and outsider.poll() is None
        # Now the leader too (its killed child, which it has not reaped, is still in the session).
        assert proc.kill_session() == 2
        assert leader.wait(timeout=10) == -signal.SIGKILL
        assert outsider.poll() is None  # another session: never signalled
    finally:
        loop.close()
        for p in (leader, outsider):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_pid_no_longer_in_the_session_is_not_signalled() -> None:
    # The session is checked again on the process itself (a pidfd) right before the signal.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        assert launcher._kill_if_in_session(other.pid, sid=os.getsid(0)) is False  # noqa: SLF001
        assert other.poll() is None
        assert launcher._kill_if_in_session(other.pid, sid=other.pid) is True  # noqa: SLF001
        assert other.wait(timeout=10) == -signal.SIGKILL
    finally:
        if other.poll() is None:
            other.kill()
        other.wait()
