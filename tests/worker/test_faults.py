"""Fault suite on the real control plane: exactly-once, noisy tasks, orphans, stubborn tasks.

Each test is bounded in count and time. The full-size variants (4 workers x 200 tasks, a 100 MB
log) are marked ``slow``; smaller variants of the same checks run by default.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from worker.controlplane import ControlPlane

pytestmark = [pytest.mark.controlplane, pytest.mark.faults]


def _exactly_once(cp: ControlPlane, start_worker, tmp_path: Path, workers: int, count: int) -> None:
    marker = tmp_path / "once"
    marker.mkdir()
    # The test control plane uses SQLite, where the server can hand one job to several workers:
    # confirm_start_s makes a worker check it owns a try before running it (see README).
    started = [start_worker(queues="q_once", concurrency=2, extra_args=["--confirm-start-s", "0.3"])
               for _ in range(workers)]
    run_id = cp.trigger("outpost_exactly_once", conf={"count": count, "marker_dir": str(marker)})
    assert cp.wait_for_run("outpost_exactly_once", run_id, timeout_s=60 + 6 * count) == "success"
    states = cp.task_states("outpost_exactly_once", run_id)
    assert sum(1 for k, v in states.items() if k.startswith("once[") and v == "success") == count
    executions = {int(p.name): p.read_text().splitlines() for p in marker.iterdir()}
    assert sorted(executions) == list(range(count))
    duplicated = {i: lines for i, lines in executions.items() if len(lines) != 1}
    assert not duplicated, f"task instances executed more than once: {duplicated}"
    served_by = {line.split()[1] for lines in executions.values() for line in lines}
    assert len(served_by) >= 2, f"expected the work to be shared, got {served_by}"
    assert all(w.proc is not None and w.proc.poll() is None for w in started)


def test_exactly_once_two_workers_forty_tasks(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    _exactly_once(control_plane, start_worker, tmp_path, workers=2, count=40)


@pytest.mark.slow
def test_exactly_once_four_workers_two_hundred_tasks(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    _exactly_once(control_plane, start_worker, tmp_path, workers=4, count=200)


def _noisy(cp: ControlPlane, start_worker, lines: int) -> None:
    w = start_worker(queues="q_noisy")
    rss_before = psutil.Process(w.proc.pid).memory_info().rss
    peak = rss_before
    run_id = cp.trigger("outpost_noisy", conf={"lines": lines})
    deadline = time.monotonic() + 600
    while (state := cp.api.get(f"/dags/outpost_noisy/dagRuns/{run_id}").json()["state"]) not in ("success", "failed"):
        peak = max(peak, psutil.Process(w.proc.pid).memory_info().rss)
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert state == "success"
    growth_mb = (peak - rss_before) / 2**20
    assert growth_mb < 50, f"worker RSS grew by {growth_mb:.0f} MB while a task logged {lines} lines"
    log = next(w.log_folder.rglob("*.log"))
    assert log.stat().st_size > lines * 100 * 0.9  # the log really was written, locally


def test_noisy_task_10mb_keeps_worker_memory_bounded(control_plane: ControlPlane, start_worker) -> None:
    _noisy(control_plane, start_worker, lines=100_000)


@pytest.mark.slow
def test_noisy_task_100mb_keeps_worker_memory_bounded(control_plane: ControlPlane, start_worker) -> None:
    _noisy(control_plane, start_worker, lines=1_000_000)


def test_processes_a_task_leaves_behind_are_reaped(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_forker")
    marker = tmp_path / "forker"
    marker.mkdir()
    run_id = control_plane.trigger("outpost_forker", conf={"marker_dir": str(marker)})
    assert control_plane.wait_for_run("outpost_forker", run_id) == "success"
    child, detached = (int(p) for p in (marker / "pids").read_text().split())
    deadline = time.monotonic() + 20
    while _alive(child) or _alive(detached):
        assert time.monotonic() < deadline, f"left-behind processes still running: child={_alive(child)} detached={_alive(detached)}"
        time.sleep(0.3)
    assert "left running after it ended" in w.log()


def test_task_ignoring_sigterm_is_killed_after_grace(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_stubborn", extra_args=["--drain-timeout-s", "2", "--kill-grace-s", "2"])
    marker = tmp_path / "stubborn"
    marker.mkdir()
    run_id = control_plane.trigger("outpost_stubborn", conf={"marker_dir": str(marker)})
    deadline = time.monotonic() + 90
    while not (marker / "started").exists():
        assert time.monotonic() < deadline, w.log()
        time.sleep(0.2)
    t0 = time.monotonic()
    assert w.stop(signal.SIGTERM, timeout_s=60) == 0
    assert time.monotonic() - t0 < 60
    assert "drain timeout: sending SIGTERM" in w.log() and "SIGKILL" in w.log()
    assert control_plane.wait_for_run("outpost_stubborn", run_id, timeout_s=90) == "failed"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
