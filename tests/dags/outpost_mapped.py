"""Dynamic task mapping over dozens of items, then a reduce."""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_mapped"}, max_active_tasks=64)
def outpost_mapped():
    @task
    def items() -> list[int]:
        return list(range(36))

    @task
    def square(x: int) -> int:
        return x * x

    @task
    def total(values) -> int:
        return sum(values)

    total(square.expand(x=items()))


outpost_mapped()
