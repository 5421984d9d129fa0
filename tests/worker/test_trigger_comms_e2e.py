"""Local triggers that ask the control plane (the Task SDK's comms), against the real control plane,
which runs no triggerer: a deferral can only end on the worker, and every answer a trigger got came
through the worker's egress gateway with its try's token (the ledger rows say ``via trigger``)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane

LOCAL = ["--triggers", "local"]
QUEUE = "q_trigger_comms"


def _trigger_rows(state_folder: Path) -> list[dict]:
    """The ledger's rows of requests a local trigger sent."""
    with sqlite3.connect(state_folder / "egress.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT task, endpoint, method, kind, outcome, rule, status FROM egress "
                                            "WHERE task LIKE '% via trigger' ORDER BY id")]


def _run_at(cp, dag_id: str, logical_date: str) -> str:
    cp.wait_for_dag(dag_id)
    run_id = f"tc_{uuid.uuid4().hex[:10]}"
    resp = cp.api.post(f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": logical_date, "conf": {}})
    assert resp.status_code < 300, resp.text
    return run_id


def _wait_waiting(worker, n: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ((worker.status() or {}).get("local_triggers") or {}).get("waiting") == n:
            return
        time.sleep(0.3)
    raise AssertionError(f"never {n} waiting triggers: {worker.log()[-3000:]}")


def _task_log(worker, task_id: str, run_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in worker.log_folder.rglob("*.log")
                   if f"task_id={task_id}" in str(p) and run_id in str(p))


@pytest.mark.timeout(240)
def test_a_deferrable_external_task_sensor_waits_on_the_worker(control_plane, start_worker) -> None:
    cp = control_plane
    worker = start_worker(queues=QUEUE, extra_args=LOCAL)
    # After the DAGs' start date and in the past (the scheduler holds other runs), unique per run.
    logical_date = (dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=uuid.uuid4().int % 100_000)).isoformat()
    sensor_run = _run_at(cp, "outpost_tc_external", logical_date)
    _wait_waiting(worker, 1)  # the sensor's WorkflowTrigger counts (nothing yet) on the worker
    upstream_run = _run_at(cp, "outpost_tc_upstream", logical_date)
    assert cp.wait_for_run("outpost_tc_upstream", upstream_run, timeout_s=120) == "success"
    assert cp.wait_for_run("outpost_tc_external", sensor_run, timeout_s=120) == "success", worker.log()[-3000:]
    assert worker.stop() == 0
    rows = _trigger_rows(worker.state_folder)
    counts = [r for r in rows if "/task-instances/count" in r["endpoint"]]
    assert counts and {r["kind"] for r in counts} == {"state"} and all(r["outcome"] == "sent" for r in counts), rows
    assert all("outpost_tc_external.wait_upstream" in r["task"] for r in counts), rows


@pytest.mark.timeout(240)
def test_trigger_dag_run_waits_for_completion_on_the_worker(control_plane, start_worker) -> None:
    cp = control_plane
    worker = start_worker(queues=QUEUE, extra_args=LOCAL)
    run_id = cp.trigger("outpost_tc_trigger_run")
    assert cp.wait_for_run("outpost_tc_trigger_run", run_id, timeout_s=180) == "success", worker.log()[-3000:]
    assert worker.stop() == 0
    rows = _trigger_rows(worker.state_folder)
    dag_runs = [r for r in rows if r["endpoint"].startswith("/execution/dag-runs/")]
    assert dag_runs and {r["kind"] for r in dag_runs} == {"dagrun"}, rows
    assert any("outpost_tc_upstream/state" in r["endpoint"] or "count" in r["endpoint"] for r in dag_runs), rows


@pytest.fixture
def central_secrets(control_plane):
    """A Variable and a Connection defined only on the control plane."""
    api = control_plane.api
    api.delete("/variables/outpost_tc_central_var")
    api.delete("/connections/outpost_tc_central_conn")
    assert api.post("/variables", json={"key": "outpost_tc_central_var", "value": "central-value"}).status_code < 300
    assert api.post("/connections", json={"connection_id": "outpost_tc_central_conn", "conn_type": "generic",
                                          "host": "central.example", "login": "carol"}).status_code < 300
    yield
    api.delete("/variables/outpost_tc_central_var")
    api.delete("/connections/outpost_tc_central_conn")


@pytest.mark.timeout(240)
def test_a_trigger_reads_a_central_variable_and_connection_under_local_first(control_plane, start_worker,
                                                                             central_secrets) -> None:
    cp = control_plane
    worker = start_worker(queues=QUEUE, extra_args=[*LOCAL, "--secrets", "local-first"],
                          env={"AIRFLOW_VAR_OUTPOST_TC_LOCAL_ONLY": "unused"})
    run_id = cp.trigger("outpost_tc_secrets")
    assert cp.wait_for_run("outpost_tc_secrets", run_id, timeout_s=180) == "success", _task_log(worker, "read", run_id)
    assert cp.xcom("outpost_tc_secrets", run_id, "read") == {"variable": "central-value", "host": "central.example",
                                                            "login": "carol"}
    assert worker.stop() == 0
    rows = _trigger_rows(worker.state_folder)
    kinds = {(r["kind"], r["outcome"]) for r in rows}
    assert ("variable", "sent") in kinds and ("connection", "sent") in kinds, rows


@pytest.mark.timeout(240)
def test_local_only_refuses_a_trigger_the_central_variable(control_plane, start_worker, central_secrets) -> None:
    cp = control_plane
    worker = start_worker(queues=QUEUE, extra_args=[*LOCAL, "--secrets", "local-only"])
    run_id = cp.trigger("outpost_tc_secrets")
    assert cp.wait_for_run("outpost_tc_secrets", run_id, timeout_s=180) == "failed"
    log = _task_log(worker, "read", run_id)
    assert "rule secrets=local-only refuses fetching variable 'outpost_tc_central_var'" in log, log[-3000:]
    assert worker.stop() == 0
    [refused] = [r for r in _trigger_rows(worker.state_folder) if r["outcome"] == "refused"]
    assert refused["kind"] == "variable" and refused["rule"] == "secrets=local-only", refused


@pytest.mark.timeout(240)
def test_a_trigger_sets_and_reads_an_xcom(control_plane, start_worker) -> None:
    cp = control_plane
    worker = start_worker(queues=QUEUE, extra_args=LOCAL)
    run_id = cp.trigger("outpost_tc_xcom")
    assert cp.wait_for_run("outpost_tc_xcom", run_id, timeout_s=180) == "success", _task_log(worker, "roundtrip", run_id)
    value = {"set_by": "trigger", "n": 42}
    assert cp.xcom("outpost_tc_xcom", run_id, "roundtrip") == {"read_back": value}
    assert cp.xcom("outpost_tc_xcom", run_id, "roundtrip", key="from_trigger") == value
    assert worker.stop() == 0
    methods = {(r["method"], r["kind"]) for r in _trigger_rows(worker.state_folder)}
    assert ("POST", "xcom") in methods and ("GET", "xcom") in methods, methods
