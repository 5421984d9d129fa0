"""Local triggers (``--triggers local``) against the real control plane, which runs no triggerer:
nothing central can finish a deferral, so every resume seen here happened on the worker."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from airflow_outpost.worker.testing.flag_server import FlagServer

pytestmark = pytest.mark.controlplane

LOCAL = ["--triggers", "local"]


@pytest.fixture
def flag_server() -> Iterator[tuple[str, threading.Event]]:
    """A loopback HTTP server answering 404 until the test raises its flag, then 200 with JSON."""
    server = FlagServer()
    try:
        yield server.url, server.up
    finally:
        server.close()


def _wait_state(cp, dag_id: str, run_id: str, task: str, states: set[str], timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = cp.task_states(dag_id, run_id).get(task)
        if state in states:
            return state
        time.sleep(0.3)
    raise AssertionError(f"{dag_id}/{run_id} {task} stayed {state}, not {states}")


def _wait_status(worker, check, timeout_s: float = 60) -> dict:
    """The worker's status.json once ``check(status)`` holds (it is rewritten about every second)."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        status = worker.status() or {}
        try:
            if check(status):
                return status
        except (KeyError, TypeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"worker status never matched: {json.dumps(status)[:3000]}\n{worker.log()[-3000:]}")


def _waiting(n: int):
    return lambda status: status["local_triggers"]["waiting"] == n


def _task_processes(worker) -> list[psutil.Process]:
    """Task processes (Task SDK supervisors and their tasks) under the worker's tree."""
    root = psutil.Process(worker.proc.pid)
    return [p for p in root.children(recursive=True) if "outpost task:" in " ".join(p.cmdline())]


def _state_rows(state_folder: Path) -> list[dict]:
    """The ledger's rows of task state changes (``PATCH .../state``): endpoint, outcome, rule, bytes."""
    with sqlite3.connect(state_folder / "egress.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT endpoint, outcome, rule, bytes FROM egress "
                                            "WHERE endpoint LIKE '%/state' AND method = 'PATCH' ORDER BY id")]


@pytest.mark.timeout(300)
def test_time_delta_and_http_triggers_resume_on_the_worker(control_plane, start_worker, flag_server) -> None:
    cp = control_plane
    url, up = flag_server
    worker = start_worker(queues="q_defer", extra_args=LOCAL)
    delta = cp.trigger("outpost_defer", conf={"kind": "delta", "wait_s": 2})
    http_run = cp.trigger("outpost_defer", conf={"kind": "http", "url": url})
    assert cp.wait_for_run("outpost_defer", delta, timeout_s=120) == "success", worker.log()[-4000:]
    result = cp.xcom("outpost_defer", delta, "wait")
    # Resumed in a new task process, on the same try, with the kwargs given to defer() and the event.
    assert result["kind"] == "delta" and result["deferred_at"] == 1 and result["try"] == 1, result
    assert result["before"]["try"] == 1 and result["before"]["pid"] != result["pid"], result
    assert "DateTime" in result["event"] or "20" in result["event"], result
    # The HTTP trigger waits (the task runs on the server's side, no process here) until the flag is up.
    assert _wait_state(cp, "outpost_defer", http_run, "wait", {"running"}) == "running"
    time.sleep(3)
    assert cp.task_states("outpost_defer", http_run)["wait"] == "running"
    status = _wait_status(worker, _waiting(1))
    [job] = [j for j in status["jobs"] if "outpost_defer" in j["key"]]
    assert job["waiting"] is True and job["pid"] is None, job
    assert not _task_processes(worker)
    up.set()
    assert cp.wait_for_run("outpost_defer", http_run, timeout_s=60) == "success", worker.log()[-4000:]
    result = cp.xcom("outpost_defer", http_run, "wait")
    assert result["event"] == {"flag": "up", "i": -1} and result["try"] == 1, result
    # Nothing of the deferral left the worker: kept in the ledger, never sent.
    rows = _state_rows(worker.state_folder)
    kept = [r for r in rows if r["rule"] == "local trigger"]
    assert len(kept) == 2 and {r["outcome"] for r in kept} == {"kept"}, rows
    assert {r["outcome"] for r in rows if r not in kept} == {"sent"}, rows  # the two successes
    log = cp.task_log("outpost_defer", http_run, "wait")
    assert "flag is up" in log or worker.status() is not None


def _task_log(worker, dag_id: str, run_id: str, attempt: int = 1) -> str:
    """The task's log file on the worker (the trigger's lines and the resumed process's go there too)."""
    files = list(worker.log_folder.glob(f"dag_id={dag_id}/run_id={run_id}/task_id=wait/attempt={attempt}.log"))
    return files[0].read_text(errors="replace") if files else ""


@pytest.mark.timeout(240)
def test_central_triggers_leave_the_task_deferred(control_plane, start_worker) -> None:
    """The stock behaviour, kept by default: the deferral goes to the control plane, whose (absent)
    triggerer would run it; the task stays deferred."""
    cp = control_plane
    worker = start_worker(queues="q_defer")
    run_id = cp.trigger("outpost_defer", conf={"kind": "delta", "wait_s": 1})
    assert _wait_state(cp, "outpost_defer", run_id, "wait", {"deferred"}) == "deferred"
    time.sleep(6)  # well past the trigger's moment: nothing here resumes it
    assert cp.task_states("outpost_defer", run_id)["wait"] == "deferred"
    assert (worker.status() or {}).get("local_triggers") is None
    sent = [r for r in _state_rows(worker.state_folder) if r["outcome"] == "sent"]
    assert sent and sent[-1]["bytes"] > 0, sent  # the trigger's kwargs left, as the stock worker sends them
    cp.api.patch(f"/dags/outpost_defer/dagRuns/{run_id}/taskInstances/wait", json={"new_state": "failed"})


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "conf", "expected"), [
    ("never", {"timeout_s": 3}, "Trigger timeout"),
    ("broken", {}, "deliberate trigger failure from outpost_triggers"),
    ("missing", {}, "is not importable on this worker"),
])
def test_a_failing_wait_fails_the_task_with_its_error_in_the_task_log(control_plane, start_worker, kind, conf,
                                                                       expected) -> None:
    cp = control_plane
    worker = start_worker(queues="q_defer", extra_args=LOCAL)
    run_id = cp.trigger("outpost_defer", conf={"kind": kind, **conf})
    assert cp.wait_for_run("outpost_defer", run_id, timeout_s=120) == "failed", worker.log()[-4000:]
    log = _task_log(worker, "outpost_defer", run_id)
    assert expected in log, log[-3000:]
    assert "TaskDeferral" in log, log[-3000:]  # failed by the Task SDK on resume, as Airflow's own trigger failures are
    _wait_status(worker, lambda st: st["local_triggers"]["waiting"] == 0 and st["finished"]["task"] == {"failed": 1})


@pytest.mark.timeout(300)
def test_a_trigger_ending_the_task_sets_its_state(control_plane, start_worker) -> None:
    """``TaskSuccessEvent`` (a sensor's ``end_from_trigger``): the task ends without resuming."""
    cp = control_plane
    worker = start_worker(queues="q_defer", extra_args=LOCAL)
    run_id = cp.trigger("outpost_defer", conf={"kind": "end"})
    assert cp.wait_for_run("outpost_defer", run_id, timeout_s=120) == "success", worker.log()[-4000:]
    worker.wait_for_log("its local trigger ended the task as success")  # logged just after the server took it
    assert "resumed" not in worker.log()


@pytest.mark.timeout(300)
def test_marking_a_waiting_task_failed_stops_its_trigger(control_plane, start_worker) -> None:
    cp = control_plane
    worker = start_worker(queues="q_defer", extra_args=LOCAL)
    run_id = cp.trigger("outpost_defer", conf={"kind": "never"})
    _wait_status(worker, _waiting(1))
    resp = cp.api.patch(f"/dags/outpost_defer/dagRuns/{run_id}/taskInstances/wait", json={"new_state": "failed"})
    assert resp.status_code == 200, resp.text
    # The next heartbeat of the waiting try (every 30 s) finds it failed.
    _wait_status(worker, lambda st: st["local_triggers"]["ended"] == {"gone": 1}, 75)
    assert "no longer running on this worker" in worker.log()
    assert "never-trigger stopped" in _task_log(worker, "outpost_defer", run_id)  # its cleanup ran
    time.sleep(3)
    assert cp.task_states("outpost_defer", run_id)["wait"] == "failed"
    assert "resumed" not in worker.log()


@pytest.mark.slow  # about a minute: 50 task starts and 50 resumes on 4 slots
@pytest.mark.timeout(400)
def test_fifty_waiting_tasks_hold_no_slot_and_all_resume(control_plane, start_worker, flag_server) -> None:
    cp = control_plane
    url, up = flag_server
    worker = start_worker(queues="q_defer", concurrency=4, extra_args=LOCAL)
    many = cp.trigger("outpost_defer_many", conf={"url": url})
    status = _wait_status(worker, lambda st: st["local_triggers"]["waiting"] == 50 and st["free_slots"] == 4, 240)
    assert len(status["jobs"]) == 50 and all(j["waiting"] and j["pid"] is None for j in status["jobs"]), status
    assert not _task_processes(worker)
    # Other tasks get the slots meanwhile.
    quick = cp.trigger("outpost_defer_quick")
    assert cp.wait_for_run("outpost_defer_quick", quick, timeout_s=120) == "success"
    assert set(cp.task_states("outpost_defer_many", many).values()) == {"running"}
    up.set()
    assert cp.wait_for_run("outpost_defer_many", many, timeout_s=240) == "success", worker.log()[-4000:]
    assert sorted(cp.xcom("outpost_defer_many", many, "wait", map_index=i) for i in range(50)) == list(range(50))
    _wait_status(worker, lambda st: st["local_triggers"]["ended"] == {"resume": 50} and not st["jobs"])
    assert all(ti["try_number"] == 1 for ti in cp.task_instances("outpost_defer_many", many))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("policy", ["stop", "adopt"])
def test_a_worker_killed_while_tasks_wait(control_plane, start_worker, flag_server, policy) -> None:
    """stop: the restarted worker reports the waiting try failed and Airflow retries it (try 2 waits
    and succeeds); adopt: the restarted worker runs the trigger again and try 1 still resumes."""
    import signal

    cp = control_plane
    url, up = flag_server
    args = [*LOCAL, "--crash-policy", policy]
    worker = start_worker(queues="q_defer", extra_args=args)
    run_id = cp.trigger("outpost_defer_retry", conf={"kind": "http", "url": url})
    _wait_status(worker, _waiting(1))
    worker.send(signal.SIGKILL)
    worker.wait(30)
    again = start_worker(queues="q_defer", name=worker.name, state_folder=worker.state_folder, extra_args=args)
    if policy == "adopt":
        _wait_status(again, _waiting(1), 30)
        assert "waiting on local trigger" in again.log()
    up.set()
    assert cp.wait_for_run("outpost_defer_retry", run_id, timeout_s=180) == "success", again.log()[-4000:]
    result = cp.xcom("outpost_defer_retry", run_id, "wait")
    assert result["event"]["flag"] == "up"
    [ti] = cp.task_instances("outpost_defer_retry", run_id)
    if policy == "adopt":
        assert ti["try_number"] == 1 and result["try"] == 1, (ti, result)
    else:
        assert "it waited on a local trigger and crash_policy is stop" in again.log()
        assert ti["try_number"] == 2 and result["try"] == 2, (ti, result)


@pytest.mark.timeout(240)
def test_a_drain_waits_for_waiting_tasks_then_stops_their_triggers(control_plane, start_worker) -> None:
    """Waiting tasks count as running for the drain; past the drain timeout their triggers stop and
    they are reported failed before the worker signs off."""
    import signal

    cp = control_plane
    worker = start_worker(queues="q_defer", extra_args=[*LOCAL, "--drain-timeout-s", "3"])
    run_id = cp.trigger("outpost_defer", conf={"kind": "never"})
    _wait_status(worker, _waiting(1))
    # Waiting is counted when the deferral is kept; the trigger runs once the runner child has
    # started (seconds on a loaded machine): stop it only once it runs, so there is a trigger to stop.
    deadline = time.monotonic() + 60
    while "waits on worker" not in _task_log(worker, "outpost_defer", run_id):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    worker.send(signal.SIGTERM)
    assert worker.wait(60) == 0
    log = worker.log()
    assert "draining 1 job(s)" in log and "drain timeout: stopped 1 local trigger(s)" in log, log[-3000:]
    assert "never-trigger stopped" in _task_log(worker, "outpost_defer", run_id)
    assert _wait_state(cp, "outpost_defer", run_id, "wait", {"failed"}) == "failed"
