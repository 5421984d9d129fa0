"""The environment every task process (and the worker's own services: zygote, model service,
Ray, trigger runner) starts with: the gateway as the Execution API, the worker's folders, the
services it may use, and the timeouts an outage hold needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_outpost.worker.config import group_id, task_user_ids
from airflow_outpost.worker.processes.gateway_client import GATEWAY_UID_ENV

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.hosted.model_host import ModelHost
    from airflow_outpost.worker.hosted.ray_host import RayHost


def model_service_ids(s: Settings) -> dict[str, int]:
    """The model service's extra client and socket group when tasks run as ``task_user``."""
    if s.task_user is None or s.log_group is None:
        return {}
    return {"task_uid": task_user_ids(s.task_user)[0], "shared_gid": group_id("log_group", s.log_group)}


def task_env(settings: Settings, *, egress: Egress, metrics_dir: Path | None, models: ModelHost | None,
             ray: RayHost | None) -> dict[str, str]:
    """The environment for a task process: this process's, with the worker's settings over it.

    ``metrics_dir`` is where runners write their metrics (None: not collected); ``models`` the
    model service the worker owns; ``ray`` the Ray the worker gives tasks (its own variables are
    scrubbed here and set per task).
    """
    s = settings
    env = {
        # Example DAG bundles are a control-plane convenience; loading them slows every task start.
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # The Task SDK supervisor notices its task has exited only when its select() times out,
        # after up to min_heartbeat_interval (default 5 s): the slot stays busy that long.
        # 1 s frees slots promptly, at the cost of more frequent task heartbeats.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        **os.environ,
    }
    env.update({
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": egress.url or s.execution_api,
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(s.log_folder.resolve()),
        "OUTPOST_WORKER_NAME": s.name,
    })
    if egress.url is not None:
        # Task processes send their token only while this uid listens on the gateway port
        # (processes.gateway_client): under crash_policy adopt they outlive this process.
        env[GATEWAY_UID_ENV] = str(os.getuid())
    if s.outage_hold_s > 0:
        # The gateway holds a request through an outage; the Task SDK client (5 s timeout,
        # 5 tries by default) must wait for it rather than give up and send it again.
        env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"] = str(int(s.outage_hold_s + s.request_timeout_s + 30))
    if metrics_dir is not None:
        env["OUTPOST_METRICS_DIR"] = str(metrics_dir.resolve())
    if s.dags_folder is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(s.dags_folder.resolve())
    if models is not None:
        env["OUTPOST_MODEL_SOCKET"] = str(models.socket)
        if s.task_user is not None:  # tasks of another uid: the service they reach is the worker's
            env["OUTPOST_MODEL_SERVICE_UID"] = str(os.getuid())
    elif not s.model_service:
        # A service a task started would be stopped with the task's leftovers: load in-task.
        env["OUTPOST_MODEL_SERVICE"] = "0"
    if ray is not None:
        ray.scrub(env)  # its variables are set per task, while the worker's Ray is up (jobrunner)
    egress.apply_task_env(env)
    return env
