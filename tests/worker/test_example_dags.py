"""Airflow's own example DAGs (core and the standard provider) give the same task outcomes through
``outpost worker --triggers local`` with no central triggerer as through the stock
``airflow edge worker`` with a central ``airflow triggerer`` (slow: two passes over ~90 DAGs).

One control plane of its own (on PostgreSQL), with the example files copied into its DAG folder and the
scheduler's own schedules off (``use_job_schedule = False``: only the runs the test makes, and those
their tasks trigger, run). Each pass triggers every DAG once at one logical date (``now``, as the
UI does), waits for every run made since it began (those ``TriggerDagRunOperator`` made included)
to end, and records each DAG's runs as (state, task states). The outpost pass runs first, the stock
pass second, same queue, same concurrency.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.stock_worker import StockWorkerProc
from airflow_outpost.worker.testing.worker_process import WorkerProc

pytestmark = [pytest.mark.slow, pytest.mark.controlplane]

CONCURRENCY = 8
PASS_TIMEOUT_S = 1200
# Example files left out, and why.
EXCLUDED = {
    "example_kubernetes_executor.py": "needs a Kubernetes cluster and the kubernetes package (does not parse here)",
    "example_local_kubernetes_executor.py": "needs a Kubernetes cluster and the kubernetes package (does not parse here)",
    "tutorial_taskflow_api_virtualenv.py": "builds a virtualenv with pip per task: needs a package index, minutes a task",
    "tutorial_objectstorage.py": "fetches from a public web API (the test machine has no internet)",
    "example_dag_decorator.py": "fetches http://httpbin.org (the test machine has no internet)",
    "example_retry_policy.py": "calls https://api.example.com (no internet here) and retries it 5 times, 30 s apart",
    "example_asset_partition.py": "partitioned-asset timetables: a manual run needs a partition key; scheduler only",
    "example_asset_allow_teams.py": "needs multi-team mode ([core] multi_team) on the control plane",
    "example_workday_timetable.py": "its timetable is an example plugin, which only load_examples registers",
    "example_custom_weight.py": "its priority weight strategy is an example plugin, which only load_examples registers",
    "std_example_python_operator.py": "builds virtualenvs with pip per task: needs a package index, minutes a task",
    "std_example_python_decorator.py": "builds virtualenvs with pip per task: needs a package index, minutes a task",
    "std_example_branch_operator.py": "builds virtualenvs with pip per task: needs a package index, minutes a task",
    "std_example_branch_operator_decorator.py": "builds virtualenvs with pip per task: needs a package index",
    "std_example_hitl_operator.py": "waits for a human's answer (tests/worker/test_trigger_comms_e2e.py answers one)",
}
# DAGs a test run does not trigger itself: another example DAG's TriggerDagRunOperator runs them.
TRIGGERED_BY = {"child_dag": "example_external_task", "example_trigger_target_dag": "example_trigger_controller_dag"}
# Tasks that wait past any bound a test can keep, in either mode: a pass ends without them, as "waiting".
WAITS = {("example_sensors", "timeout_after_second_date_in_the_future_async"):
         "a deferrable TimeSensor passes no timeout to defer(), so its timeout=1 does not end it: it waits "
         "until an hour after its file was parsed, on the central triggerer as on the worker"}
TERMINAL = {"success", "failed", "skipped", "upstream_failed", "removed"}
# Outcomes that are noise: only the run states are compared for these DAGs.
NOISE = {
    "example_branch_dop_operator_v3": "branches on the parity of the minute the run started",
    "example_branch_datetime_operator": "branches on the wall clock at the moment the task runs",
    "example_branch_datetime_operator_2": "branches on the wall clock at the moment the task runs",
    "example_branch_datetime_operator_3": "branches on the wall clock at the moment the task runs",
}


def _example_files() -> list[tuple[Path, str]]:
    import airflow.example_dags as core
    import airflow.providers.standard.example_dags as standard

    out = []
    for package, prefix in ((core, ""), (standard, "std_")):
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            if path.name != "__init__.py" and prefix + path.name not in EXCLUDED:
                out.append((path, prefix + path.name))
    return out


@pytest.fixture(scope="module")
def examples_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    dags = tmp_path_factory.mktemp("example-dags")
    for path, name in _example_files():
        shutil.copy(path, dags / name)
    # PostgreSQL, as production control planes: eight tasks at once lock SQLite out of the API server.
    cp = ControlPlane(dags_folder=dags, home=tmp_path_factory.mktemp("airflow-examples"), db="postgres",
                      extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                                 # Parsed once: re-parsing every 5 s (the tests' default) takes a core.
                                 "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
                                 "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000"})
    cp.start(timeout_s=300)
    try:
        yield cp
    finally:
        cp.stop()


def _dag_ids(cp: ControlPlane, timeout_s: float = 600) -> list[str]:
    """Every parsed DAG, once the dag-processor has parsed every file (the count holds for 30 s)."""
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        dags = cp.api.get("/dags", params={"limit": 500}).json()["dags"]
        if len(dags) != last:
            last, since = len(dags), time.monotonic()
        elif last > 0 and time.monotonic() - since > 30:
            errors = cp.api.get("/importErrors").json()["import_errors"]
            assert errors == [], [(e["filename"], e["stack_trace"][-300:]) for e in errors]
            return sorted(d["dag_id"] for d in dags)
        time.sleep(2)
    raise AssertionError(f"the example DAGs were not parsed within {timeout_s}s ({last} so far)")


def _runs_since(cp: ControlPlane, t0: str) -> list[dict]:
    page = cp.api.get("/dags/~/dagRuns", params={"run_after_gte": t0, "limit": 1000}).json()
    return page["dag_runs"]


def _ended(cp: ControlPlane, run: dict) -> dict[str, str | None] | None:
    """The run's task states once it ended, or once only tasks in WAITS wait (as "waiting"); else None."""
    if run["state"] not in ("success", "failed") and not any(dag == run["dag_id"] for dag, _ in WAITS):
        return None
    tasks = cp.task_states(run["dag_id"], run["dag_run_id"])
    if run["state"] in ("success", "failed"):
        return tasks
    waiting = {task for task, state in tasks.items() if state not in TERMINAL}
    if all((run["dag_id"], task) in WAITS and tasks[task] in ("running", "deferred") for task in waiting):
        return {**tasks, **{task: "waiting" for task in waiting}}
    return None


def _one_pass(cp: ControlPlane, dag_ids: list[str], label: str) -> dict[str, list]:
    """Trigger every DAG once, wait for every run since, return ``{dag_id: sorted [(state, tasks)]}``."""
    t0 = dt.datetime.now(dt.UTC)
    logical_date = t0.isoformat()
    outcomes: dict[str, list] = {}
    for dag_id in dag_ids:
        if dag_id in TRIGGERED_BY:
            continue
        resp = cp.api.post(f"/dags/{dag_id}/dagRuns", json={"dag_run_id": f"{label}__{dag_id}",
                                                             "logical_date": logical_date, "conf": {}})
        if resp.status_code >= 300:  # e.g. params a manual run must fill in: refused the same way each pass
            outcomes[dag_id] = [("refused", resp.status_code)]
    deadline, settled = time.monotonic() + PASS_TIMEOUT_S, 0
    while time.monotonic() < deadline:
        try:
            runs = _runs_since(cp, t0.isoformat())
            ended = [_ended(cp, r) for r in runs]
        except httpx.TransportError:  # a poll the loaded API server dropped is no outcome: poll again
            time.sleep(2)
            continue
        settled = settled + 1 if all(e is not None for e in ended) else 0
        if settled >= 5:  # ended, and for 10 s no run started another
            break
        time.sleep(2)
    else:
        pending = {r["dag_id"]: r["state"] for r in _runs_since(cp, t0.isoformat()) if r["state"] not in ("success", "failed")}
        raise AssertionError(f"{label}: runs not ended within {PASS_TIMEOUT_S}s: {pending}")
    for run, tasks in zip(runs, ended, strict=True):
        outcomes.setdefault(run["dag_id"], []).append((run["state"], sorted((tasks or {}).items())))
    return {dag_id: sorted(v, key=json.dumps) for dag_id, v in outcomes.items()}


def _compared(outcomes: dict[str, list]) -> dict[str, list]:
    return {dag_id: ([state for state, _ in runs] if dag_id in NOISE else runs) for dag_id, runs in outcomes.items()}


@pytest.mark.timeout(3600)
def test_example_dags_end_the_same_with_local_triggers_as_with_the_stock_worker(examples_cp: ControlPlane,
                                                                                tmp_path: Path) -> None:
    cp = examples_cp
    dag_ids = _dag_ids(cp)
    started = time.monotonic()
    worker = WorkerProc(cp, tmp_path, queues="default", concurrency=CONCURRENCY, extra_args=["--triggers", "local"]).start()
    try:
        local = _one_pass(cp, dag_ids, "local")
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    local_s = time.monotonic() - started
    cp.start_triggerer()
    stock = StockWorkerProc(cp, tmp_path, queues="default", concurrency=CONCURRENCY).start()
    try:
        central = _one_pass(cp, dag_ids, "stock")
    finally:
        stock.stop()
        cp.stop_triggerer()
    stock_s = time.monotonic() - started - local_s
    report = {"dags": len(dag_ids), "local_s": round(local_s), "stock_s": round(stock_s), "local": local, "stock": central}
    (tmp_path / "example-dags.json").write_text(json.dumps(report, indent=1))
    print(f"example DAGs: {len(dag_ids)} DAGs, local triggers pass {local_s:.0f}s, stock pass {stock_s:.0f}s")
    assert set(local) == set(central) == set(dag_ids), (set(dag_ids) - set(local), set(dag_ids) - set(central))
    differ = {d: {"local": _compared(local)[d], "stock": _compared(central)[d]} for d in dag_ids
              if _compared(local)[d] != _compared(central)[d]}
    assert differ == {}, json.dumps(differ, indent=1)[-8000:]
    # The case the local triggers' comms exist for: a deferrable ExternalTaskSensor on another DAG.
    assert local["example_external_task"][0][0] == "success", local["example_external_task"]
