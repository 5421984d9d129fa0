"""Run as the worker's task_user: probes what the worker keeps to itself, then uses the control
plane (Variables, XCom) and a Connection from the worker's environment as a task normally does."""
import datetime
import os

from airflow.sdk import BaseHook, Variable, dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_task_user"})
def outpost_task_user():
    @task
    def probe() -> dict:
        conf = get_current_context()["dag_run"].conf
        seen: dict = {"uid": os.getuid()}
        targets = {"secret": conf["secret"], "config": conf["config"], "environ": f"/proc/{conf['worker_pid']}/environ",
                   "ledger_key": conf["ledger_key"]}
        for name, path in targets.items():
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
                seen[name] = "read"
            except OSError as exc:
                seen[name] = type(exc).__name__
        Variable.set("outpost_task_user_var", "set-by-task-user")
        seen["variable"] = Variable.get("outpost_task_user_var")
        seen["conn_host"] = BaseHook.get_connection("outpost_task_user_db").host
        return seen

    @task
    def big() -> str:
        return "x" * 100_000  # over xcom_threshold_bytes: kept in the region store

    @task
    def check(seen: dict, value: str) -> dict:
        return {**seen, "big_len": len(value), "check_uid": os.getuid()}

    check(probe(), big())


outpost_task_user()
