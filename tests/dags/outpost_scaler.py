"""Thirty independent tasks on queue ``gpu``: the autoscaling backlog (tests/deploy/test_scaler_e2e.py).

dag_run.conf: {"seconds": float}. Every task is queued at once (no planner task), so with no
worker the whole backlog waits on the queue.
"""
import datetime
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "gpu"}, max_active_tasks=64)
def outpost_scaler():
    for i in range(30):
        @task(task_id=f"t{i:02d}")
        def work() -> None:
            time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 1)))

        work()


outpost_scaler()
