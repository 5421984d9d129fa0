"""Deadline alerts: the scheduler hands the callback to the Edge executor, the worker runs it."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.controlplane


@pytest.fixture
def store_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dl-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(300)
def test_a_missed_deadlines_callback_runs_on_the_worker(control_plane, start_worker, store_root) -> None:
    cp = control_plane
    # Callbacks come on [operators] default_queue ("default"), the task on its own queue.
    worker = start_worker(queues="default,q_deadline", extra_args=["--store-root", str(store_root)])
    cp.wait_for_dag("outpost_deadline")
    run_id = cp.trigger("outpost_deadline")
    deadline = time.monotonic() + 120
    while not list(store_root.glob("deadline-*.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    markers = list(store_root.glob("deadline-*.json"))
    assert len(markers) == 1, worker.log()[-4000:]
    written = json.loads(markers[0].read_text())
    # Written by the callback, in a process of this worker, with the alert's kwargs and context.
    assert written["tag"] == "missed" and written["worker"] == worker.name
    assert written["deadline"].get("id") and markers[0].name == f"deadline-{written['deadline']['id']}.json"
    assert run_id in json.dumps(written["dag_run"]), written
    assert cp.wait_for_run("outpost_deadline", run_id, timeout_s=120) == "success"
    log = worker.log()
    assert "ExecuteCallback" in log and "unsupported workload type" not in log
    # Reported to the server like a task: the edge job of the callback reached success.
    [callback_log] = list((worker.log_folder / "executor_callbacks" / "outpost_deadline" / run_id).glob("*"))
    assert callback_log.stat().st_size > 0
    # The egress ledger tells the callback's traffic from the tasks' and the worker's own.
    from airflow_outpost.worker.egress import ledger

    by_workload = {w["workload"]: w for w in ledger.report(worker.state_folder / "egress.sqlite")["workloads"]}
    assert by_workload["callback"]["requests"] >= 1 and by_workload["task"]["requests"] >= 1, by_workload
    assert by_workload["worker"]["requests"] >= 1, by_workload
    status = worker.status() or {}
    assert status.get("finished", {}).get("callback") == {"success": 1}, status
