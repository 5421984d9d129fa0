"""Memory benchmark DAG (airflow DAG file): ``n`` mapped tasks that hold their slot for ``sleep`` s;
with ``heavy`` each first imports what a typical data task imports (pyarrow, the SQL provider)."""
import datetime
import time

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, max_active_tasks=64,
     # Retries: on SQLite the server can hand one job to a worker twice; the stock worker then reports
     # the refused second start failed, which fails the running try (outpost leaves it alone).
     default_args={"queue": "bench", "retries": 2, "retry_delay": datetime.timedelta(seconds=1)},
     params={"n": 1, "sleep": 45, "heavy": False})
def bench_memory():
    @task
    def items(**context) -> list[int]:
        return list(range(int(context["params"]["n"])))

    @task
    def hold(i: int, **context) -> int:
        if context["params"]["heavy"]:
            import pyarrow  # noqa: F401
            from airflow.providers.common.sql.hooks import sql  # noqa: F401
        time.sleep(float(context["params"]["sleep"]))
        return i

    hold.expand(i=items())


bench_memory()
