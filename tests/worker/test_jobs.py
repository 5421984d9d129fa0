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


def _with(path: str, value) -> dict:
    job = copy.deepcopy(GOOD)
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
        ("command.type", "ExecuteCallback", "unsupported workload type", True),
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
