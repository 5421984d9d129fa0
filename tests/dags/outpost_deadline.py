"""A DAG whose deadline passes while its task runs, so the alert's callback runs on the worker
(airflow DAG file). The callback writes what it was given into the worker's region store."""
import datetime
import json
import os
from pathlib import Path

from airflow.sdk import DAG, DeadlineAlert, DeadlineReference, SyncCallback, task


def record_missed_deadline(tag: str, context: dict | None = None, **kwargs: object) -> None:
    store = Path(os.environ["OUTPOST_STORE_ROOT"])
    context = context or {}
    deadline = context.get("deadline") or {}
    (store / f"deadline-{deadline.get('id', 'unknown')}.json").write_text(json.dumps({
        "tag": tag, "worker": os.environ.get("OUTPOST_WORKER_NAME"), "pid": os.getpid(),
        "deadline": deadline, "dag_run": context.get("dag_run"),
    }, default=str))


with DAG("outpost_deadline", schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
         default_args={"queue": "q_deadline"},
         deadline=DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=datetime.timedelta(seconds=3),
                                callback=SyncCallback(record_missed_deadline, kwargs={"tag": "missed"}))):

    @task
    def slow() -> str:
        import time

        time.sleep(25)
        return "done"

    slow()
