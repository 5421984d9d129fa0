"""Local-triggers benchmark DAGs (airflow DAG file): ``n`` mapped tasks that wait until a loopback HTTP flag
(conf ``url``, the benchmark's flag server; each task adds ``?i=<index>``) answers 200, two ways:

* ``bench_triggers_local``: each task defers with :class:`bench_triggers_flag.FlagTrigger` polling every
  ``poll_s`` (for ``outpost worker --triggers local``; the control plane runs no triggerer);
* ``bench_triggers_reschedule``: each task is a sensor in ``mode="reschedule"`` whose ``poke()`` GETs the
  same URL, ``poke_interval=5``: it holds a slot only while it pokes, then gives it back until its next poke.
"""
import datetime

import httpx
from airflow.sdk import BaseOperator, BaseSensorOperator, dag
from bench_triggers_flag import FlagTrigger

N = 50
DEFAULTS = {"queue": "bench", "retries": 2, "retry_delay": datetime.timedelta(seconds=1)}


def _url(context, index: int) -> str:
    return f"{context['params']['url']}?i={index}"


class FlagWait(BaseOperator):
    def __init__(self, *, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def execute(self, context):
        self.defer(trigger=FlagTrigger(_url(context, self.index), poll_s=float(context["params"]["poll_s"])),
                   method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return self.index


class FlagSensor(BaseSensorOperator):
    def __init__(self, *, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index

    def poke(self, context) -> bool:
        return httpx.get(_url(context, self.index), timeout=10).status_code == 200


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, max_active_tasks=64,
     default_args=DEFAULTS, params={"url": "http://127.0.0.1:9/flag", "poll_s": 5.0})
def bench_triggers_local():
    FlagWait.partial(task_id="wait").expand(index=list(range(N)))


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, max_active_tasks=64,
     default_args=DEFAULTS, params={"url": "http://127.0.0.1:9/flag"})
def bench_triggers_reschedule():
    FlagSensor.partial(task_id="sense", mode="reschedule", poke_interval=5, timeout=3600).expand(index=list(range(N)))


bench_triggers_local()
bench_triggers_reschedule()
