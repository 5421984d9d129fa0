"""Deferrable tasks for the airflow DAG tests of local triggers (``outpost worker --triggers local``).

``outpost_defer``: one task per kind of wait, chosen by the run's conf ``kind``:
``delta`` (TimeDeltaTrigger), ``http`` (polls conf ``url``), ``never`` (times out after conf
``timeout_s``), ``broken`` (the trigger raises), ``missing`` (its class is not importable),
``end`` (the trigger ends the task itself), ``read`` (the trigger reads conf ``variable`` and
``conn_id`` from the control plane through the Task SDK's comms). ``outpost_defer_retry``: the same with one retry.
``outpost_defer_many``: 50 mapped tasks that wait on conf ``url``. ``outpost_defer_quick``:
short tasks that must run while others wait.
"""
from __future__ import annotations

import datetime
import os

from airflow.sdk import BaseOperator, dag, task
from outpost_triggers import BrokenTrigger, ControlPlaneReadTrigger, HttpFlagTrigger, MissingTrigger, NeverTrigger

QUEUE = {"queue": "q_defer"}


class WaitOperator(BaseOperator):
    """Pushes an XCom, defers as the run's conf says, and on resume returns what it saw."""

    def execute(self, context):
        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

        conf = context["dag_run"].conf or {}
        kind = conf.get("kind", "delta")
        context["ti"].xcom_push(key="before", value={"pid": os.getpid(), "try": context["ti"].try_number})
        timeout = datetime.timedelta(seconds=float(conf["timeout_s"])) if conf.get("timeout_s") else None
        trigger = {
            "delta": lambda: TimeDeltaTrigger(datetime.timedelta(seconds=float(conf.get("wait_s", 2)))),
            "end": lambda: TimeDeltaTrigger(datetime.timedelta(seconds=1), end_from_trigger=True),
            "http": lambda: HttpFlagTrigger(conf["url"]),
            "never": NeverTrigger,
            "broken": BrokenTrigger,
            "missing": MissingTrigger,
            "read": lambda: ControlPlaneReadTrigger(conf.get("variable", ""), conf.get("conn_id", "")),
        }[kind]()
        self.defer(trigger=trigger, method_name="execute_complete", kwargs={"kind": kind, "deferred_at": 1},
                   timeout=timeout)

    def execute_complete(self, context, event=None, kind=None, deferred_at=None):
        before = context["ti"].xcom_pull(task_ids=self.task_id, key="before")
        return {"kind": kind, "deferred_at": deferred_at, "event": str(event) if kind == "delta" else event,
                "pid": os.getpid(), "try": context["ti"].try_number, "before": before}


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args=QUEUE)
def outpost_defer():
    WaitOperator(task_id="wait")


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={**QUEUE, "retries": 1, "retry_delay": datetime.timedelta(seconds=1)})
def outpost_defer_retry():
    WaitOperator(task_id="wait")


class ManyWaitOperator(BaseOperator):
    def __init__(self, *, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def execute(self, context):
        self.defer(trigger=HttpFlagTrigger(context["dag_run"].conf["url"], poll_s=1.0), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return self.index


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args=QUEUE)
def outpost_defer_many():
    ManyWaitOperator.partial(task_id="wait").expand(index=list(range(50)))


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args=QUEUE)
def outpost_defer_quick():
    @task
    def quick(i: int) -> int:
        return i

    quick.expand(i=list(range(6)))


outpost_defer()
outpost_defer_retry()
outpost_defer_many()
outpost_defer_quick()
