"""Exactly once at launch: a task process the zygote forks after its launch timed out never runs.

The zygote is stopped (SIGSTOP) past the launch timeout, then continued: the launch has failed by
then (the job runner fails the job), and the process forked late exits before it runs the task's
code, and the worker kills it at once and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from airflow_outpost.worker.errors import LaunchTimeoutError
from airflow_outpost.worker.processes.launcher import TaskLauncher
from airflow_outpost.worker.processes.task_main import LATE_START_EXIT

# Not a valid ExecuteTask: a task process that runs it prints the Task SDK's validation error, which
# shows (in its output file) that it got as far as the task's code.
PROBE = {"type": "Probe", "token": "t"}


def test_a_task_process_forked_after_its_launch_timed_out_is_killed_before_it_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="airflow_outpost.worker.processes.launcher")
    out = tmp_path / "out"

    async def main() -> tuple[str, str, int]:
        launcher = TaskLauncher(output_dir=out, prewarm=1, start_timeout_s=2.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        await launcher.start(env)
        try:
            # In time: the request is run (and fails on the probe workload, in the task's code).
            control = await launcher.launch(PROBE, "http://127.0.0.1:9/execution/")
            assert await asyncio.wait_for(control.wait(), 120) == 1
            control_output = control.output.read_text()
            zygote = psutil.Process(control.pid).ppid() if psutil.pid_exists(control.pid) else None
            zygote = zygote or next(p.pid for p in psutil.Process().children() if "--zygote" in p.cmdline())
            before = set(out.glob("task-*.out"))
            os.kill(zygote, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(LaunchTimeoutError, match="did not start within 2s"):
                    await launcher.launch(PROBE, "http://127.0.0.1:9/execution/")
                assert time.monotonic() - started < 10
                assert not [p for p in psutil.Process(zygote).children() if p.status() != psutil.STATUS_ZOMBIE]
            finally:
                os.kill(zygote, signal.SIGCONT)
            for _ in range(200):  # the zygote forks it now, and says so
                if "after its launch timed out" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            late_pid = int(re.search(r"task process (\d+) \(request", caplog.text).group(1))  # type: ignore[union-attr]
            for _ in range(100):  # reaped by the zygote
                if not psutil.pid_exists(late_pid) or psutil.Process(late_pid).status() == psutil.STATUS_ZOMBIE:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"late task process {late_pid} still runs")
            # Killed before it could even open its output file, or it refused by itself (its deadline).
            late = [p.read_text() for p in set(out.glob("task-*.out")) - before]
            return control_output, "".join(late), late_pid
        finally:
            await launcher.aclose()

    control_output, late_output, _ = asyncio.run(main())
    assert "alidation" in control_output, control_output  # a process in time runs the task's code
    # The late one ran nothing of the task.
    assert "alidation" not in late_output and "Traceback" not in late_output, late_output
    assert re.search(r"task process \d+ \(request \w+\) started [\d.]+s after its launch timed out; its job was "
                     r"failed then, so it was killed", caplog.text), caplog.text


def test_a_late_task_process_refuses_to_run_by_itself(tmp_path: Path) -> None:
    """The child's own check, for a worker too slow to kill it: past its deadline it runs nothing."""
    import json
    import subprocess
    import sys

    output = tmp_path / "late.out"
    request = {"id": "r1", "workload": PROBE, "server": "http://127.0.0.1:9/execution/", "env": {},
               "output": str(output), "exit_file": None, "deadline": time.time() - 5}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    zygote = subprocess.Popen([sys.executable, "-m", "airflow_outpost.worker.processes.task_main", "--zygote"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert zygote.stdout is not None and zygote.stdin is not None
        assert json.loads(zygote.stdout.readline())["event"] == "ready"
        zygote.stdin.write((json.dumps(request) + "\n").encode())
        zygote.stdin.flush()
        events = [json.loads(zygote.stdout.readline()) for _ in range(2)]
    finally:
        zygote.stdin.close()  # type: ignore[union-attr]
        zygote.wait(60)
    assert [e["event"] for e in events] == ["started", "exit"]
    assert events[1]["code"] == LATE_START_EXIT
    text = output.read_text()
    assert "after its launch timed out" in text and "the task is not run here" in text, text
    assert "alidation" not in text, text
