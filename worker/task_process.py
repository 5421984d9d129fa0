"""Entry point of a task process: ``python -m worker.task_process``.

The worker starts these ahead of need ("pre-warmed"): the process imports the Task SDK, then
blocks reading one JSON line from stdin ``{"workload": ..., "server": ..., "env": {...}}``. On
receiving it, it applies the per-task environment and runs the task through the Task SDK's
``supervise_task``, exiting with its exit code. EOF on stdin (the worker no longer needs the
spare) exits 0 without running anything.

If the worker dies, the kernel sends this process SIGUSR1 (``PR_SET_PDEATHSIG``); the handler
SIGKILLs the task's process tree, and the Task SDK supervisor, still alive, reports the task
failed to the control plane and exits. A task never runs on unsupervised (the Task SDK's own
SIGTERM handling only calls ``on_kill()`` and lets the task go on, so SIGTERM is not enough).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


_job_started = False


def kill_descendants(sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every descendant of this process; return how many were signalled."""
    import psutil

    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
            count += 1
        except psutil.NoSuchProcess:
            pass
    return count


def _on_worker_death(signum: int, frame: object) -> None:
    kill_descendants()
    if not _job_started:
        os._exit(0)
    # Otherwise return: the supervisor sees its task die and reports the failure before exiting.


def _die_with_parent(expected_parent: int) -> None:
    signal.signal(signal.SIGUSR1, _on_worker_death)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker's crash recovery stops leftovers
        return
    if os.getppid() != expected_parent:  # the worker died before prctl took effect
        sys.exit(1)


def _preload() -> None:
    """Import what the forked task runner needs, so each task's child inherits it ready-made."""
    import importlib

    for module in (
        "airflow.sdk.execution_time.task_runner",
        "airflow.dag_processing.bundles.manager",
        "airflow.dag_processing.dagbag",
        "airflow.providers.standard.decorators.python",
        "airflow.providers.standard.operators.python",
    ):
        try:
            importlib.import_module(module)
        except ImportError:  # optional providers may be absent on a worker
            pass


def main() -> int:
    parent = int(os.environ.pop("OUTPOST_PARENT_PID", os.getppid()))
    _die_with_parent(parent)
    # Import the heavy parts now, while idle, so a fetched task starts without paying for them.
    from airflow.executors.workloads import ExecuteTask
    from airflow.sdk.execution_time.supervisor import supervise_task

    _preload()

    line = sys.stdin.readline()
    if not line.strip():
        return 0
    global _job_started
    _job_started = True
    msg = json.loads(line)
    os.environ.update({k: str(v) for k, v in msg.get("env", {}).items()})
    workload = ExecuteTask.model_validate(msg["workload"])
    try:
        from setproctitle import setproctitle

        ti = workload.ti
        setproctitle(f"outpost task: {ti.dag_id}.{ti.task_id} run={ti.run_id} map={ti.map_index} try={ti.try_number}")
    except ImportError:
        pass
    return supervise_task(
        ti=workload.ti,  # the DTO duck-types as the SDK TaskInstance, as in Airflow's own executors
        bundle_info=workload.bundle_info,
        dag_rel_path=workload.dag_rel_path,
        token=workload.token,
        server=msg["server"],
        log_path=workload.log_path,
        sentry_integration=workload.sentry_integration,
    )


if __name__ == "__main__":
    sys.exit(main())
