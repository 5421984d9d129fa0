"""Triggers that ask the control plane (the Task SDK's comms), against the real control plane, two ways:

* ``local``: ``--triggers local`` and no central triggerer, so a deferral can only end on the worker;
  every answer a trigger got came through the worker's egress gateway with its try's token (the
  ledger rows say ``via trigger``), and the control plane received nothing the ledger does not show;
* ``central`` (slow): ``--triggers central`` and a real ``airflow triggerer`` next to the control
  plane, the stock path; the same DAGs give the same outcomes, and no trigger request passes the worker.

The one difference in outcome is the secrets policy: it is the worker's, so ``--secrets local-only``
refuses a local trigger a central Variable, while the central triggerer reads it from its database.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane

QUEUE = "q_trigger_comms"
CENTRAL_PASSWORD = "central-conn-pw-7d1"
ACCESS = re.compile(r"^(\S+) .*\[http\.access\].* method=(\S+) path=(\S+)")


@pytest.fixture(scope="module", params=["local", pytest.param("central", marks=pytest.mark.slow)])
def mode(request: pytest.FixtureRequest, control_plane) -> Iterator[str]:
    """Where triggers run; ``central`` starts the control plane's triggerer for this module's tests."""
    if request.param == "central":
        control_plane.start_triggerer()
    try:
        yield request.param
    finally:
        control_plane.stop_triggerer()


def _rows(state_folder: Path, where: str = "1") -> list[dict]:
    with sqlite3.connect(state_folder / "egress.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT ts, task, endpoint, method, kind, outcome, rule, status FROM egress "
                                            f"WHERE {where} ORDER BY id")]


def _trigger_rows(state_folder: Path) -> list[dict]:
    """The ledger's rows of requests a local trigger sent."""
    return _rows(state_folder, "task LIKE '% via trigger'")


def _server_requests(cp, t0: float) -> Counter:
    """``(method, path)`` of every Execution API request the API server answered since ``t0``."""
    seen: Counter = Counter()
    for line in (cp.home / "cp-logs" / "api-server.log").read_text(errors="replace").splitlines():
        m = ACCESS.match(line)
        # openapi.json: the worker's own version check at start (not a task's), which the ledger does not list.
        if m and m.group(3).startswith("/execution/") and m.group(3) != "/execution/openapi.json":
            with_tz = m.group(1).replace("Z", "+00:00")
            try:
                ts = dt.datetime.fromisoformat(with_tz).timestamp()
            except ValueError:
                continue
            if ts >= t0:
                seen[(m.group(2), m.group(3))] += 1
    return seen


def _check_ledger(cp, worker, mode: str, t0: float, kinds: set[tuple[str, str]]) -> list[dict]:
    """Local: each request a trigger sent is a ledger row with its kind (``kinds``: (method, kind)
    that must be among them), and the control plane received exactly what the ledger shows as sent.
    Central: no request passed the worker for a trigger. Returns the trigger rows."""
    rows = _trigger_rows(worker.state_folder)
    if mode == "central":
        assert rows == [], rows
        return rows
    assert (rows or not kinds) and all(r["kind"] and r["kind"] != "other" for r in rows), rows
    assert kinds <= {(r["method"], r["kind"]) for r in rows}, rows
    sent = Counter((r["method"], r["endpoint"].split("?", 1)[0]) for r in _rows(worker.state_folder, "outcome = 'sent'")
                   if r["endpoint"].startswith("/execution/"))
    deadline = time.monotonic() + 10  # the server logs a request once it answered it
    while (server := _server_requests(cp, t0)) != sent and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server == sent, {"server only": server - sent, "ledger only": sent - server}
    return rows


def _start(start_worker, mode: str, *args: str, **kwargs):
    return start_worker(queues=QUEUE, extra_args=["--triggers", mode, *args], **kwargs)


def _run_at(cp, dag_id: str, logical_date: str) -> str:
    cp.wait_for_dag(dag_id)
    run_id = f"tc_{uuid.uuid4().hex[:10]}"
    resp = cp.api.post(f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": logical_date, "conf": {}})
    assert resp.status_code < 300, resp.text
    return run_id


def _wait_state(cp, dag_id: str, run_id: str, task_id: str, states: set[str], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cp.task_states(dag_id, run_id).get(task_id) in states:
            return
        time.sleep(0.3)
    raise AssertionError(f"{dag_id}.{task_id} never {states}: {cp.task_states(dag_id, run_id)}")


def _wait_deferred(cp, worker, mode: str, dag_id: str, run_id: str, task_id: str, timeout_s: float = 90) -> None:
    """Until the task waits on its trigger: on the worker (local), or deferred on the control plane."""
    if mode == "central":
        _wait_state(cp, dag_id, run_id, task_id, {"deferred"}, timeout_s)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ((worker.status() or {}).get("local_triggers") or {}).get("waiting") == 1:
            return
        time.sleep(0.3)
    raise AssertionError(f"never a waiting trigger: {worker.log()[-3000:]}")


def _task_log(worker, task_id: str, run_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in worker.log_folder.rglob("*.log")
                   if f"task_id={task_id}" in str(p) and run_id in str(p))


@pytest.mark.timeout(300)
def test_a_deferrable_external_task_sensor(control_plane, start_worker, mode) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode)
    # After the DAGs' start date and in the past (the scheduler holds other runs), unique per run.
    logical_date = (dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=uuid.uuid4().int % 100_000)).isoformat()
    sensor_run = _run_at(cp, "outpost_tc_external", logical_date)
    _wait_deferred(cp, worker, mode, "outpost_tc_external", sensor_run, "wait_upstream")  # counts nothing yet
    upstream_run = _run_at(cp, "outpost_tc_upstream", logical_date)
    assert cp.wait_for_run("outpost_tc_upstream", upstream_run, timeout_s=120) == "success"
    assert cp.wait_for_run("outpost_tc_external", sensor_run, timeout_s=120) == "success", worker.log()[-3000:]
    assert worker.stop() == 0
    rows = _check_ledger(cp, worker, mode, t0, {("GET", "state")})
    counts = [r for r in rows if "/task-instances/count" in r["endpoint"]]
    assert mode == "central" or (counts and all(r["outcome"] == "sent" for r in counts)), rows
    assert all("outpost_tc_external.wait_upstream" in r["task"] for r in counts), rows


@pytest.mark.timeout(300)
def test_trigger_dag_run_waits_for_completion(control_plane, start_worker, mode) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode)
    run_id = cp.trigger("outpost_tc_trigger_run")
    assert cp.wait_for_run("outpost_tc_trigger_run", run_id, timeout_s=180) == "success", worker.log()[-3000:]
    assert worker.stop() == 0
    rows = _check_ledger(cp, worker, mode, t0, {("GET", "dagrun")})
    assert mode == "central" or {r["kind"] for r in rows if r["endpoint"].startswith("/execution/dag-runs/")} == {"dagrun"}


@pytest.fixture
def central_secrets(control_plane):
    """A Variable and a Connection defined only on the control plane."""
    api = control_plane.api
    api.delete("/variables/outpost_tc_central_var")
    api.delete("/connections/outpost_tc_central_conn")
    assert api.post("/variables", json={"key": "outpost_tc_central_var", "value": "central-value"}).status_code < 300
    assert api.post("/connections", json={"connection_id": "outpost_tc_central_conn", "conn_type": "generic",
                                          "host": "central.example", "login": "carol",
                                          "password": CENTRAL_PASSWORD}).status_code < 300
    yield
    api.delete("/variables/outpost_tc_central_var")
    api.delete("/connections/outpost_tc_central_conn")


@pytest.mark.timeout(300)
def test_a_trigger_reads_a_central_variable_and_connection_under_local_first(control_plane, start_worker, mode,
                                                                             central_secrets) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode, "--secrets", "local-first", env={"AIRFLOW_VAR_OUTPOST_TC_LOCAL_ONLY": "unused"})
    run_id = cp.trigger("outpost_tc_secrets")
    assert cp.wait_for_run("outpost_tc_secrets", run_id, timeout_s=180) == "success", _task_log(worker, "read", run_id)
    assert cp.xcom("outpost_tc_secrets", run_id, "read") == {"variable": "central-value", "host": "central.example",
                                                            "login": "carol"}
    assert worker.stop() == 0
    if mode == "local":
        # The trigger logged the password: the Task SDK masked it when comms fetched it, the task log shows ***.
        log = _task_log(worker, "read", run_id)
        assert "login carol, password ***" in log and CENTRAL_PASSWORD not in log, log[-3000:]
    _check_ledger(cp, worker, mode, t0, {("GET", "variable"), ("GET", "connection")})


@pytest.mark.timeout(300)
def test_local_only_refuses_a_local_trigger_the_central_variable(control_plane, start_worker, mode,
                                                                 central_secrets) -> None:
    """The secrets policy is the worker's: it refuses a local trigger, not the central triggerer."""
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode, "--secrets", "local-only")
    run_id = cp.trigger("outpost_tc_secrets")
    state = cp.wait_for_run("outpost_tc_secrets", run_id, timeout_s=180)
    assert worker.stop() == 0
    if mode == "central":
        assert state == "success" and _trigger_rows(worker.state_folder) == []
        return
    assert state == "failed"
    log = _task_log(worker, "read", run_id)
    assert "rule secrets=local-only refuses fetching variable 'outpost_tc_central_var'" in log, log[-3000:]
    [refused] = [r for r in _check_ledger(cp, worker, mode, t0, {("GET", "variable")}) if r["outcome"] == "refused"]
    assert refused["kind"] == "variable" and refused["rule"] == "secrets=local-only", refused


@pytest.mark.timeout(300)
def test_a_trigger_sets_and_reads_an_xcom(control_plane, start_worker, mode) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode)
    run_id = cp.trigger("outpost_tc_xcom")
    assert cp.wait_for_run("outpost_tc_xcom", run_id, timeout_s=180) == "success", _task_log(worker, "roundtrip", run_id)
    value = {"set_by": "trigger", "n": 42}
    assert cp.xcom("outpost_tc_xcom", run_id, "roundtrip") == {"read_back": value}
    assert cp.xcom("outpost_tc_xcom", run_id, "roundtrip", key="from_trigger") == value
    assert worker.stop() == 0
    _check_ledger(cp, worker, mode, t0, {("POST", "xcom"), ("GET", "xcom")})


@pytest.mark.timeout(300)
def test_a_trigger_uses_the_asset_state_store(control_plane, start_worker, mode) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode)
    run_id = cp.trigger("outpost_tc_asset_store")
    assert cp.wait_for_run("outpost_tc_asset_store", run_id, timeout_s=180) == "success", _task_log(worker, "store", run_id)
    assert cp.xcom("outpost_tc_asset_store", run_id, "store") == {"read_back": {"set_by": "trigger", "n": 7},
                                                                  "after_delete": "deleted"}
    assert worker.stop() == 0
    rows = _check_ledger(cp, worker, mode, t0, {("PUT", "store"), ("GET", "store"), ("DELETE", "store")})
    assert mode == "central" or {r["kind"] for r in rows} == {"store"}, rows


@pytest.mark.timeout(300)
def test_an_approval_answered_through_the_rest_api(control_plane, start_worker, mode) -> None:
    cp, t0 = control_plane, time.time()
    worker = _start(start_worker, mode)
    run_id = cp.trigger("outpost_tc_hitl")
    # Airflow 3.3 parks the task awaiting input (no trigger); earlier lines defer it to HITLTrigger.
    _wait_state(cp, "outpost_tc_hitl", run_id, "approve", {"awaiting_input", "deferred"})
    # Answered once the worker has reported the paused process's job ended, as a person answers (seconds
    # later at least): an answer within that moment re-queues the try under the same Edge job key before
    # the old job's end is reported, and the scheduler takes that end for the new job's and fails the task.
    deadline = time.monotonic() + 60
    while any(j["state"] in ("queued", "running") for j in cp.edge_jobs("outpost_tc_hitl", run_id)):
        assert time.monotonic() < deadline, cp.edge_jobs("outpost_tc_hitl", run_id)
        time.sleep(0.3)
    path = f"/dags/outpost_tc_hitl/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"
    deadline = time.monotonic() + 90
    while (resp := cp.api.patch(path, json={"chosen_options": ["Approve"]})).status_code == 404:
        assert time.monotonic() < deadline, resp.text  # the task has not written its request yet
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    assert cp.wait_for_run("outpost_tc_hitl", run_id, timeout_s=180) == "success", _task_log(worker, "approve", run_id)
    assert cp.task_states("outpost_tc_hitl", run_id) == {"approve": "success", "after": "success"}
    assert worker.stop() == 0
    if mode == "local":
        _check_ledger(cp, worker, mode, t0, set())  # no trigger on 3.3: whatever left is in the ledger
