"""DAGs for the dispatch benchmark: a chain of 8 no-op tasks and a fan-out of 50 mapped no-ops."""
import datetime

from airflow.sdk import chain, dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "bench"})
def bench_chain8():
    @task
    def noop(i: int) -> int:
        return i

    chain(*[noop.override(task_id=f"step{i}")(i) for i in range(8)])


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "bench"},
     max_active_tasks=64)
def bench_fanout50():
    @task
    def noop(i: int) -> int:
        return i

    noop.expand(i=list(range(50)))


bench_chain8()
bench_fanout50()
