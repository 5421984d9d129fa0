"""DAGs for the outage faults: tasks that finish while the control plane is away, and tokens
that expire in the queue or during a long task. Each DAG has its own queue."""
import datetime
import os
import time

from airflow.sdk import dag, get_current_context, task


def _mark(name: str, text: str = "") -> None:
    marker = get_current_context()["dag_run"].conf["marker_dir"]
    with open(os.path.join(marker, name), "a") as fh:
        fh.write(f"{text or os.getpid()}\n")


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_outage", "retries": 0})
def outpost_outage():
    """conf: {"marker_dir": str, "seconds": float}. One task succeeds, one fails, both after ``seconds``."""

    @task
    def finishes_ok() -> str:
        _mark("ok.started")
        time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 25)))
        _mark("ok.executions")
        return "done"

    @task
    def finishes_failed() -> None:
        _mark("failed.started")
        time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 25)) - 3)
        _mark("failed.executions")
        raise ValueError("this task fails on purpose")

    finishes_ok()
    finishes_failed()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "q_linkdrop"})
def outpost_linkdrop():
    @task
    def long_enough() -> int:
        _mark("started")
        time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 30)))
        _mark("executions")
        return 7

    long_enough()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_token_queued", "retries": 1, "retry_delay": datetime.timedelta(seconds=0)})
def outpost_token_queued():
    @task
    def quick() -> str:
        _mark("executions", str(get_current_context()["ti"].try_number))
        return "ran"

    quick()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_token_long", "retries": 0})
def outpost_token_long():
    @task
    def outlives_its_token() -> str:
        time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 40)))
        _mark("executions")
        return "still authorised"

    outlives_its_token()


outpost_outage()
outpost_linkdrop()
outpost_token_queued()
outpost_token_long()
