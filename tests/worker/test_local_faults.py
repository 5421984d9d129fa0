"""Nothing lost (#24, item 7): local faults around the state folder, the drain and the settings, each sent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_outpost.worker.cli.main import main
from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.jobs import Job, JobKey
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.runtime.job_runner import JobRunner
from airflow_outpost.worker.runtime.job_table import RunningJob
from airflow_outpost.worker.runtime.link import ControlPlaneLink
from airflow_outpost.worker.runtime.state import StateFolder

_HOLD_LOCK = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              "os.write(fd, str(os.getpid()).encode())\n"
              "print('outpost-like worker holds the lock', flush=True)\n"
              "time.sleep(60)\n")


def _status(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status.json").write_text(json.dumps({
        "pid": pid, "name": "w1", "api_url": "http://cp:8080", "state": "idle", "updated": time.time(),
        "disconnected_since": None, "queues": None, "concurrency": 1, "free_slots": 1, "jobs": []}))


def test_a_truncated_status_file_reads_as_none_at_start_and_in_outpost_status(tmp_path: Path, capsys) -> None:
    (tmp_path / "status.json").write_text('{"pid": 4242, "name": "w1", "sta')  # written without fsync, power cut
    assert StateFolder(tmp_path).read_status() is None  # what the worker reads at start
    assert main(["status", "--state-folder", str(tmp_path)]) == 1
    assert "missing or unreadable" in capsys.readouterr().err
    (tmp_path / "status.json").write_text("")
    assert main(["status", "--json", "--state-folder", str(tmp_path)]) == 1


def test_outpost_stop_does_not_signal_a_pid_from_a_stale_status_file(tmp_path: Path, capsys) -> None:
    # The worker died without signing off; its pid now belongs to an unrelated process.
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        _status(tmp_path, stranger.pid)
        (tmp_path / "worker.lock").write_text(str(stranger.pid))  # left behind, held by nobody
        assert main(["stop", "--state-folder", str(tmp_path)]) == 1
        assert "no running worker" in capsys.readouterr().err
        time.sleep(0.2)
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_outpost_stop_signals_the_process_that_holds_the_state_folder_lock(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "worker.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        _status(tmp_path, holder.pid)
        assert main(["stop", "--state-folder", str(tmp_path)]) == 0
        assert holder.wait(timeout=10) == -15  # SIGTERM
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(("flag", "value"), [("drain_timeout_s", "nan"), ("kill_grace_s", "inf"),
                                             ("poll_interval_s", "nan"), ("outage_hold_s", "nan"),
                                             ("exit_when_idle_s", "inf"), ("budgets", "queue:gpu=nan")])
def test_nan_and_inf_durations_fail_validation_naming_the_setting(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"api_url": "http://cp:8080", "queues": "gpu", flag: value}, env={"OUTPOST_JWT_SECRET": "s" * 64})
    assert flag in str(err.value) and "finite" in str(err.value)


def test_the_drain_waits_for_final_reports_within_its_budget_not_a_fixed_minute(tmp_path: Path) -> None:
    """A job whose final report hangs (its last log push on a dead link) must not keep the worker past
    stop_budget_s, which a supervisor's stop timeout is sized by: it would be SIGKILLed mid-flush."""
    settings = load_settings({"api_url": "http://cp:8080", "state_folder": str(tmp_path)}, env={"OUTPOST_JWT_SECRET": "s" * 64})

    async def scenario() -> float:
        runner = JobRunner(settings, client=None, egress=None, launcher=None, state_folder=None,  # type: ignore[arg-type]
                           link=ControlPlaneLink(queues=None, concurrency=1), gpus=None, counter=None,  # type: ignore[arg-type]
                           events=None, costs=None, budgets=None, ray=None, sysinfo=dict,  # type: ignore[arg-type]
                           on_slot_freed=lambda: None)
        key = JobKey("dag", "t", "run", 1, -1)
        hung = asyncio.create_task(asyncio.sleep(3600))  # its final report never completes
        runner.running[key] = RunningJob(Job(key, 1, "default", {}, "dag/t.log", "dag.py"), task=hung)
        started = time.monotonic()
        try:
            await asyncio.wait_for(runner.drain(0.3, 0.2, asyncio.Event(), after_kill_s=0.2), 20)
        finally:
            hung.cancel()
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert took < 3.0, f"drain took {took:.1f}s with a budget of 0.7s"
