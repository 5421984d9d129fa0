"""Fault suite on the real control plane: exactly-once, noisy tasks, orphans, stubborn tasks,
and tasks adopted by a worker restarted after a crash (``crash_policy = adopt``).

Each test is bounded in count and time. The full-size variants (4 workers x 200 tasks, a 100 MB
log) are marked ``slow``; smaller variants of the same checks run by default.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.tcp_proxy import TcpProxy
from airflow_outpost.worker.testing.worker_process import run_outpost

pytestmark = [pytest.mark.controlplane, pytest.mark.faults]


def _exactly_once(cp: ControlPlane, start_worker, tmp_path: Path, workers: int, count: int) -> None:
    marker = tmp_path / "once"
    marker.mkdir()
    # On SQLite the server can hand one job to several workers (its SKIP LOCKED claim is a no-op):
    # confirm_start_s makes a worker check it owns a try before running it (see README). On
    # PostgreSQL (OUTPOST_TEST_DB=postgres) the claim locks, and the workers run as configured.
    confirm = ["--confirm-start-s", "0.3"] if cp.db != "postgres" else []
    started = [start_worker(queues="q_once", concurrency=2, extra_args=confirm) for _ in range(workers)]
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
    print(f"\nRELIABILITY exactly-once db={cp.db} workers={workers} tasks={count} succeeded={count} lost=0 duplicates=0 "
          f"served_by={len(served_by)}")


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
    print(f"\nRELIABILITY noisy-task log_mb={log.stat().st_size / 2**20:.0f} worker_rss_growth_mb={growth_mb:.1f} "
          "tasks=1 lost=0")


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
    w.wait_for_log("left running after it ended")  # logged just after the kill
    print(f"\nRELIABILITY orphans reaped_within_s={20 - (deadline - time.monotonic()):.1f} tasks=1 lost=0")


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
    stop_s = time.monotonic() - t0
    assert stop_s < 60
    assert "drain timeout: sending SIGTERM" in w.log() and "SIGKILL" in w.log()
    assert control_plane.wait_for_run("outpost_stubborn", run_id, timeout_s=90) == "failed"
    print(f"\nRELIABILITY sigterm-ignored drain_timeout_s=2 kill_grace_s=2 worker_exit_s={stop_s:.1f} "
          "task=failed (killed, reported)")


ADOPT = ["--crash-policy", "adopt"]


def _wait_until(check, what: str, w, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s:\n{w.log()[-4000:]}"
        time.sleep(0.2)
    return result


def _adopted_jobs(w) -> list[dict]:
    return [j for j in (w.status() or {}).get("jobs", []) if j.get("adopted")]


def _crash(w, task_pids: list[int]) -> None:
    """SIGKILL the worker; its task processes must outlive it (crash_policy adopt)."""
    w.send(signal.SIGKILL)
    w.wait(10)
    time.sleep(1)  # a parent-death signal would have taken effect by now
    assert all(_alive(p) for p in task_pids), "a task process died with its worker under crash_policy adopt"


def _start_adopt_task_and_crash(cp: ControlPlane, start_worker, tmp_path: Path, args: list[str]):
    """Run one outpost_adopt task, SIGKILL its worker mid-task; return (worker, marker, run_id, task pid)."""
    w = start_worker(queues="q_adopt", extra_args=args)
    marker = tmp_path / "adopt"
    marker.mkdir()
    run_id = cp.trigger("outpost_adopt", conf={"marker_dir": str(marker)})
    _wait_until(lambda: (marker / "started").exists(), "the task did not start", w)
    task_pid = int((marker / "started").read_text())
    _crash(w, [task_pid])
    return w, marker, run_id, task_pid


@pytest.mark.parametrize("prewarm", ["1", "0"])  # forked from the zygote, or a fresh interpreter
def test_adopted_task_succeeds_on_its_first_try_after_a_worker_crash(control_plane: ControlPlane, start_worker,
                                                                     tmp_path: Path, prewarm: str) -> None:
    args = [*ADOPT, "--prewarm", prewarm, "--push-logs", "true"]
    w, marker, run_id, task_pid = _start_adopt_task_and_crash(control_plane, start_worker, tmp_path, args)
    restarted = time.monotonic()
    w2 = start_worker(queues="q_adopt", name=w.name, state_folder=w.state_folder, extra_args=args)
    [job] = _wait_until(lambda: _adopted_jobs(w2), "the restarted worker did not adopt the task", w2)
    adopt_s = time.monotonic() - restarted
    assert "outlive" in job["key"] and job["running_s"] > 0  # counted from the task's real start
    shown = run_outpost("status", "--state-folder", str(w2.state_folder))
    assert shown.returncode == 0 and "(adopted after a crash)" in shown.stdout, shown.stdout + shown.stderr
    (marker / "release").touch()
    assert control_plane.wait_for_run("outpost_adopt", run_id, timeout_s=120) == "success", w2.log()[-4000:]
    [ti] = control_plane.task_instances("outpost_adopt", run_id)
    assert ti["state"] == "success" and ti["try_number"] == 1
    assert len((marker / "runs").read_text().splitlines()) == 1  # executed exactly once
    assert control_plane.xcom("outpost_adopt", run_id, "outlive") == {"outlived": "the worker", "pid": task_pid}
    _wait_until(lambda: not (w2.status() or {}).get("jobs"), "the adopted job did not end", w2, timeout_s=30)
    # The adopting worker pushed the rest of the task's log, up to its last line.
    _wait_until(lambda: "Returned value was" in control_plane.task_log("outpost_adopt", run_id, "outlive"),
                "the adopted task's log did not reach the control plane", w2, timeout_s=30)
    log = w2.log()
    assert "adopted outpost_adopt.outlive" in log and "succeeded" in log
    print(f"\nRELIABILITY worker-crash crash_policy=adopt prewarm={prewarm} adopted_s={adopt_s:.1f} (restart to adoption) tasks=1 "
          "try=1 lost=0 duplicates=0")


def test_adopted_tasks_that_fail_or_vanish_are_reported_failed(control_plane: ControlPlane, start_worker,
                                                               tmp_path: Path) -> None:
    w = start_worker(queues="q_adopt", concurrency=2, extra_args=ADOPT)
    vanish, fail = tmp_path / "vanish", tmp_path / "fail"
    vanish.mkdir()
    fail.mkdir()
    run_vanish = control_plane.trigger("outpost_adopt", conf={"marker_dir": str(vanish)})
    run_fail = control_plane.trigger("outpost_adopt", conf={"marker_dir": str(fail), "fail": True})
    for m in (vanish, fail):
        _wait_until(lambda m=m: (m / "started").exists(), "a task did not start", w)
    pids = {m: int((m / "started").read_text()) for m in (vanish, fail)}
    _crash(w, list(pids.values()))
    # While no worker runs, one task process dies without recording an outcome (OOM, kill -9).
    runner = psutil.Process(pids[vanish])
    supervisor = runner.parent()
    for p in (runner, supervisor):
        p.kill()
    w2 = start_worker(queues="q_adopt", concurrency=2, name=w.name, state_folder=w.state_folder, extra_args=ADOPT)
    _wait_until(lambda: _adopted_jobs(w2), "the restarted worker did not adopt the live task", w2)
    assert len(_adopted_jobs(w2)) == 1  # only the one still running
    (fail / "release").touch()
    for run_id in (run_vanish, run_fail):
        assert control_plane.wait_for_run("outpost_adopt", run_id, timeout_s=120) == "failed", w2.log()[-4000:]
        [ti] = control_plane.task_instances("outpost_adopt", run_id)
        assert ti["state"] == "failed" and ti["try_number"] == 1
    for m in (vanish, fail):
        assert len((m / "runs").read_text().splitlines()) == 1
    log = w2.log()
    # The vanished one is reported failed by the worker (never success); the adopted one's Task SDK
    # supervisor reported its task's failure itself, and its process exit was seen through polling.
    assert re.search(rf"reporting job outpost_adopt\.outlive run={re.escape(run_vanish)} try=1 from a previous worker "
                     r"run as failed: its task process is gone and recorded no outcome", log)
    assert re.search(rf"adopted outpost_adopt\.outlive run={re.escape(run_fail)} try=1", log)


def test_a_failure_reported_before_adoption_is_reported_failed_never_success(
        control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    # The restarted worker's gateway serves at once, but it registers (and adopts) only once the
    # Edge API answers: the proxy in front of it stays dark meanwhile. The adopted task fails in
    # that window; its state must reach the control plane and be the state the worker reports,
    # never a success inferred from the supervisor's exit code.
    cp = control_plane
    edge = TcpProxy("127.0.0.1", cp.port).start()
    w2 = None
    try:
        w = start_worker(queues="q_adopt", extra_args=ADOPT)
        marker = tmp_path / "window"
        marker.mkdir()
        run_id = cp.trigger("outpost_adopt", conf={"marker_dir": str(marker), "fail": True})
        _wait_until(lambda: (marker / "started").exists(), "the task did not start", w)
        task_pid = int((marker / "started").read_text())
        _crash(w, [task_pid])
        edge.pause()
        before = len(w.log())  # the restarted worker writes to the same output file
        w2 = start_worker(wait=False, queues="q_adopt", name=w.name, state_folder=w.state_folder,
                          extra_args=[*ADOPT, "--api-url", edge.url, "--execution-api-url", f"{cp.base_url}/execution/",
                                      "--startup-timeout-s", "180", "--request-timeout-s", "3"])
        _wait_until(lambda: "egress gateway for task processes on" in w2.log()[before:], "the gateway did not start", w2)
        (marker / "release").touch()
        _wait_until(lambda: not _alive(task_pid), "the task did not end in the window", w2)
        assert "registered as" not in w2.log()[before:]  # it ended before the worker could adopt it
        edge.resume()
        assert cp.wait_for_run("outpost_adopt", run_id, timeout_s=120) == "failed", w2.log()[-4000:]
        [ti] = cp.task_instances("outpost_adopt", run_id)
        assert ti["state"] == "failed" and ti["try_number"] == 1
        log = w2.wait_for_log(rf"outpost_adopt\.outlive run={re.escape(run_id)} try=1 from a previous worker run as \w+",
                              timeout_s=60)
        assert re.search(rf"reporting job outpost_adopt\.outlive run={re.escape(run_id)} try=1 from a previous worker "
                         r"run as failed: its task process reported failed", log), log[-4000:]
        assert " as success" not in log[before:]
        assert w2.stop() == 0
    finally:
        if w2 is not None and w2.proc is not None and w2.proc.poll() is None:
            w2.send(signal.SIGKILL)  # a failed test: it could not sign off through a stopped proxy
        edge.stop()
    print("\nRELIABILITY worker-crash crash_policy=adopt task failed before adoption: reported failed (its own state)")


def test_an_adopted_task_is_drained_and_escalated_like_any_other(control_plane: ControlPlane, start_worker,
                                                                  tmp_path: Path) -> None:
    w, _, run_id, task_pid = _start_adopt_task_and_crash(control_plane, start_worker, tmp_path, ADOPT)
    w2 = start_worker(queues="q_adopt", name=w.name, state_folder=w.state_folder,
                      extra_args=[*ADOPT, "--drain-timeout-s", "2", "--kill-grace-s", "2"])
    _wait_until(lambda: _adopted_jobs(w2), "the restarted worker did not adopt the task", w2)
    assert w2.stop(signal.SIGTERM, timeout_s=60) == 0  # never released: the drain times out
    log = w2.log()
    assert "draining 1 job(s)" in log and "drain timeout: sending SIGTERM to 1 task(s)" in log
    assert not _alive(task_pid)
    assert control_plane.wait_for_run("outpost_adopt", run_id, timeout_s=90) == "failed"
    assert not list((w2.state_folder / "jobs").glob("*.json"))  # its final state was queued and sent


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
