"""The dispatch benchmark's long case (``bench_dispatch.py --fanout500``): a fan-out of 500 mapped no-ops.

In a file of its own, so the chain and fan-out-50 tasks do not parse a third DAG with every start.
"""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "bench"},
     max_active_tasks=64)
def bench_fanout500():
    @task
    def noop(i: int) -> int:
        return i

    noop.expand(i=list(range(500)))


bench_fanout500()
