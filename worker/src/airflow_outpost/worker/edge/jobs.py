"""Fetched jobs are untrusted input: parse and validate them before anything runs.

:func:`parse_job` turns the JSON the Edge API returned into a :class:`Job` or raises
:class:`JobRejected` with a message naming the field and the problem. When at least the job's
identity (dag/task/run/try/map index) is readable, the rejection carries a :class:`JobKey` so the
worker can report the job failed instead of leaving it claimed forever.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_outpost.worker.errors import JobRejected

MAX_JOB_BYTES = 1_000_000
# TestConnection is not among them: edge3's EdgeExecutor does not take connection tests
# (supports_connection_test is False), so the scheduler fails them before any worker sees one.
SUPPORTED_WORKLOADS = ("ExecuteTask", "ExecuteCallback")
# How the EdgeExecutor keys a callback's edge job (edge3 models/types.py): no task instance.
CALLBACK_DAG_ID = "ExecuteCallback"
CALLBACK_FETCH_METHODS = ("import_path", "dag_attribute")


@dataclass(frozen=True)
class JobKey:
    """Identity of one task-instance try, as the Edge API addresses it."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    map_index: int
    task_instance_id: str | None = None

    def __str__(self) -> str:
        mi = f"[{self.map_index}]" if self.map_index >= 0 else ""
        return f"{self.dag_id}.{self.task_id}{mi} run={self.run_id} try={self.try_number}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id, "task_id": self.task_id, "run_id": self.run_id,
            "try_number": self.try_number, "map_index": self.map_index, "task_instance_id": self.task_instance_id,
        }


@dataclass(frozen=True)
class Job:
    """A validated job: its key, slots, and the workload to hand to the Task SDK."""

    key: JobKey
    concurrency_slots: int
    queue: str
    workload: dict[str, Any]  # the validated workload as JSON-able dict
    log_path: str
    dag_rel_path: str
    kind: str = "ExecuteTask"  # or "ExecuteCallback" (a deadline alert's callback)

    @property
    def subject(self) -> str:
        """The workload's own id, which its token names: the task instance's, or the callback's."""
        if self.kind == "ExecuteCallback":
            return str(self.workload["callback"]["id"])
        return str(self.workload["ti"]["id"])

    @property
    def ti_id(self) -> str | None:
        """The task instance id; None for a callback, which has no task instance."""
        return None if self.kind == "ExecuteCallback" else self.subject


class RejectedJob(JobRejected):
    """A job that failed validation; ``key`` is set when the job can still be reported failed."""

    def __init__(self, message: str, key: JobKey | None) -> None:
        super().__init__(message)
        self.key = key


def _field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in obj:
        raise ValueError(f"{where}: missing field {name!r}")
    value = obj[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: field {name!r} must be an integer, got {type(value).__name__}")
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _key_of(raw: dict[str, Any]) -> JobKey:
    key = JobKey(
        dag_id=_field(raw, "dag_id", str, "job"),
        task_id=_field(raw, "task_id", str, "job"),
        run_id=_field(raw, "run_id", str, "job"),
        try_number=_field(raw, "try_number", int, "job"),
        map_index=_field(raw, "map_index", int, "job"),
        task_instance_id=None,
    )
    tid = raw.get("task_instance_id")
    if tid is not None:
        try:
            tid = str(uuid.UUID(str(tid)))
        except ValueError:
            raise ValueError(f"job: task_instance_id {str(tid)[:80]!r} is not a UUID") from None
        key = JobKey(**{**key.as_dict(), "task_instance_id": tid})
    for name in ("dag_id", "task_id", "run_id"):
        value = getattr(key, name)
        if not value or len(value) > 512 or any(c in value for c in "\x00\n\r"):
            raise ValueError(f"job: {name} {value[:80]!r} is empty, too long or has control characters")
    return key


def safe_relative_path(value: Any, field: str) -> str:
    """Return ``value`` if it is a relative path that stays inside its folder, else raise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string")
    if "\x00" in value or "\\" in value:
        raise ValueError(f"{field} {value[:120]!r} contains a NUL or backslash")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError(f"{field} {value[:120]!r} is absolute; it must be relative to its folder")
    if ".." in path.parts:
        raise ValueError(f"{field} {value[:120]!r} escapes its folder with '..'")
    return value


def resolve_inside(base: Path, relative: str, field: str) -> Path:
    """Join ``relative`` to ``base`` and refuse it if symlinks make it land outside ``base``."""
    base_real = base.resolve()
    target = (base / relative).resolve()
    if target != base_real and base_real not in target.parents:
        raise JobRejected(f"{field} {relative!r} resolves to {target}, outside {base_real} (symlink escape)")
    return target


def parse_job(raw: Any) -> Job:
    """Validate one fetched job. Raises :class:`RejectedJob` (with ``key`` when known).

    Pure: no I/O, no Airflow import; safe to call on any JSON value.
    """
    if not isinstance(raw, dict):
        raise RejectedJob(f"job is not a JSON object but {type(raw).__name__}", None)
    try:
        key = _key_of(raw)
    except ValueError as exc:
        raise RejectedJob(str(exc), None) from None
    try:
        slots = _field(raw, "concurrency_slots", int, "job")
        if not 1 <= slots <= 1024:
            raise ValueError(f"job: concurrency_slots {slots} must be between 1 and 1024")
        command = _field(raw, "command", dict, "job")
        kind = command.get("type", "ExecuteTask")
        if kind not in SUPPORTED_WORKLOADS:
            raise ValueError(f"job: unsupported workload type {str(kind)[:60]!r}; supported: {', '.join(SUPPORTED_WORKLOADS)}")
        workload = _validate_common(command)
        if kind == "ExecuteCallback":
            _validate_callback(command, key)
            # The EdgeExecutor queues callbacks on [operators] default_queue; the job does not say which.
            queue = "default"
        else:
            ti = _validate_ti(command)
            for name in ("dag_id", "task_id", "run_id", "try_number", "map_index"):
                if ti.get(name) != getattr(key, name):
                    raise ValueError(f"job: command.ti.{name}={ti.get(name)!r} does not match the job's "
                                     f"{name}={getattr(key, name)!r}")
            queue = str(ti.get("queue") or "default")
        log_path = safe_relative_path(workload.get("log_path"), "log_path")
        dag_rel_path = safe_relative_path(workload.get("dag_rel_path"), "dag_rel_path")
    except ValueError as exc:
        raise RejectedJob(str(exc), key) from None
    return Job(key=key, concurrency_slots=slots, queue=queue, workload=workload, log_path=log_path,
               dag_rel_path=dag_rel_path, kind=str(kind))


def _validate_ti(command: dict[str, Any]) -> dict[str, Any]:
    """Structural check of an ``ExecuteTask``'s task instance, without importing Airflow in the worker.

    The task process validates the full Task SDK schema again before running; these checks make
    sure nothing malformed or hostile is handed to it and that errors name the field.
    """
    ti = _field(command, "ti", dict, "command")
    for name in ("id", "dag_id", "task_id", "run_id"):
        _field(ti, name, str, "command.ti")
    for name in ("try_number", "map_index"):
        _field(ti, name, int, "command.ti")
    try:
        uuid.UUID(ti["id"])
    except ValueError:
        raise ValueError(f"command.ti: id {ti['id'][:80]!r} is not a UUID") from None
    for name in ("queue",):
        if name in ti and ti[name] is not None and not isinstance(ti[name], str):
            raise ValueError(f"command.ti: field {name!r} must be str")
    return ti


def _validate_callback(command: dict[str, Any], key: JobKey) -> None:
    """Structural check of an ``ExecuteCallback``'s callback, and that the job's key is its own."""
    callback = _field(command, "callback", dict, "command")
    cid = _field(callback, "id", str, "command.callback")
    try:
        uuid.UUID(cid)
    except ValueError:
        raise ValueError(f"command.callback: id {cid[:80]!r} is not a UUID") from None
    method = _field(callback, "fetch_method", str, "command.callback")
    if method not in CALLBACK_FETCH_METHODS:
        raise ValueError(f"command.callback: fetch_method {method[:40]!r} is not one of {', '.join(CALLBACK_FETCH_METHODS)}")
    data = _field(callback, "data", dict, "command.callback")
    path = _field(data, "path", str, "command.callback.data")
    if not path or len(path) > 512 or not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(f"command.callback.data: path {path[:120]!r} is not a dotted import path")
    if data.get("kwargs") is not None and not isinstance(data["kwargs"], dict):
        raise ValueError("command.callback.data: field 'kwargs' must be an object")
    expected = (CALLBACK_DAG_ID, cid, f"{CALLBACK_DAG_ID}-{cid}")
    if (key.dag_id, key.task_id, key.run_id) != expected:
        raise ValueError(f"job: a callback's key must be {expected}, got {(key.dag_id, key.task_id, key.run_id)}")


def _validate_common(command: dict[str, Any]) -> dict[str, Any]:
    """What every workload the worker runs carries: its token, DAG bundle, log and DAG paths."""
    token = _field(command, "token", str, "command")
    if not token or len(token) > 16_384:
        raise ValueError("command: token is empty or longer than 16384 characters")
    bundle = _field(command, "bundle_info", dict, "command")
    _field(bundle, "name", str, "command.bundle_info")
    if bundle.get("version") is not None and not isinstance(bundle["version"], str):
        raise ValueError("command.bundle_info: field 'version' must be str or null")
    for name in ("log_path", "dag_rel_path"):
        if command.get(name) is None:
            raise ValueError(f"command: missing field {name!r}")
    return command
