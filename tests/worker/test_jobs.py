"""Fetched-job validation: good jobs parse, bad ones are refused with the field named."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from airflow_outpost.worker.edge.jobs import RejectedJob, parse_job, resolve_inside
from airflow_outpost.worker.errors import JobRejected

TI_ID = "01a1fcb9-bdcd-7649-88f9-50577d090e30"
GOOD = {
    "dag_id": "d", "task_id": "t", "run_id": "r", "map_index": -1, "try_number": 1, "concurrency_slots": 1,
    "task_instance_id": TI_ID,
    "command": {
        "type": "ExecuteTask", "token": "tok", "dag_rel_path": "d.py", "log_path": "dag_id=d/run_id=r/task_id=t/attempt=1.log",
        "bundle_info": {"name": "dags-folder", "version": None},
        "ti": {"id": TI_ID, "dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1, "map_index": -1,
               "queue": "gpu", "pool_slots": 1, "priority_weight": 1, "dag_version_id": TI_ID},
    },
}


def _with(path: str, value, base: dict = GOOD) -> dict:
    job = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = job
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return job


def test_good_job_parses() -> None:
    job = parse_job(copy.deepcopy(GOOD))
    assert job.key.task_instance_id == TI_ID and job.queue == "gpu" and job.concurrency_slots == 1


@pytest.mark.parametrize(
    ("path", "value", "fragment", "reportable"),
    [
        ("dag_id", KeyError, "missing field 'dag_id'", False),
        ("try_number", "1", "'try_number' must be an integer", False),
        ("task_instance_id", "not-a-uuid", "not a UUID", False),
        ("concurrency_slots", 0, "concurrency_slots 0", True),
        ("command.type", "TestConnection", "unsupported workload type 'TestConnection'; supported: ExecuteTask, "
                                           "ExecuteCallback", True),
        ("command.type", "ExecuteCallback", "command: missing field 'callback'", True),  # a task's body
        ("command.log_path", "../../etc/passwd", "escapes its folder", True),
        ("command.log_path", "/etc/passwd", "is absolute", True),
        ("command.dag_rel_path", "a/../../x.py", "escapes its folder", True),
        ("command.ti.dag_id", "other", "does not match", True),
        ("command.token", 5, "'token' must be str", True),
        ("command.ti", [], "'ti' must be dict", True),
    ],
)
def test_bad_jobs_are_rejected_with_reason(path: str, value, fragment: str, reportable: bool) -> None:
    with pytest.raises(RejectedJob) as err:
        parse_job(_with(path, value))
    assert fragment in str(err.value)
    assert (err.value.key is not None) is reportable


def test_non_object_is_rejected() -> None:
    with pytest.raises(RejectedJob, match="not a JSON object"):
        parse_job(["x"])


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink("/etc", logs / "dag_id=evil")
    with pytest.raises(JobRejected, match="outside"):
        resolve_inside(logs, "dag_id=evil/passwd", "log_path")
    assert resolve_inside(logs, "dag_id=ok/x.log", "log_path") == (logs / "dag_id=ok/x.log").resolve()


CB_ID = "01a233d3-cd9c-7591-9caf-e9c6ad1eea00"
CALLBACK = {  # as edge3's EdgeExecutor queues a deadline alert's callback
    "dag_id": "ExecuteCallback", "task_id": CB_ID, "run_id": f"ExecuteCallback-{CB_ID}", "map_index": -1,
    "try_number": 0, "concurrency_slots": 1, "task_instance_id": None,
    "command": {
        "type": "ExecuteCallback", "token": "tok", "dag_rel_path": "d.py",
        "log_path": f"executor_callbacks/d/r/{CB_ID}", "bundle_info": {"name": "dags-folder", "version": None},
        "callback": {"id": CB_ID, "fetch_method": "import_path",
                     "data": {"path": "mod.on_miss", "kwargs": {"tag": "x"}, "dag_id": "d"}},
    },
}


def test_a_callback_job_parses_with_no_task_instance() -> None:
    job = parse_job(copy.deepcopy(CALLBACK))
    assert job.kind == "ExecuteCallback" and job.subject == CB_ID and job.ti_id is None
    assert job.queue == "default" and job.log_path == f"executor_callbacks/d/r/{CB_ID}"
    assert job.key.task_instance_id is None and job.key.try_number == 0


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("command.callback", KeyError, "command: missing field 'callback'"),
        ("command.callback.id", "nope", "command.callback: id 'nope' is not a UUID"),
        ("command.callback.fetch_method", "pickle", "fetch_method 'pickle' is not one of import_path, dag_attribute"),
        ("command.callback.data.path", "os; rm -rf /", "is not a dotted import path"),
        ("command.callback.data.path", KeyError, "command.callback.data: missing field 'path'"),
        ("command.callback.data.kwargs", [1], "'kwargs' must be an object"),
        ("task_id", "01a233d3-cd9c-7591-9caf-e9c6ad1eea01", "a callback's key must be"),
        ("command.log_path", "../x", "escapes its folder"),
        ("command.token", "", "token is empty"),
    ],
)
def test_bad_callback_jobs_are_rejected_with_reason_and_reported(path: str, value, fragment: str) -> None:
    with pytest.raises(RejectedJob) as err:
        parse_job(_with(path, value, CALLBACK))
    assert fragment in str(err.value)
    assert err.value.key is not None  # reported failed, the worker keeps serving
