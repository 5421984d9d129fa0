"""A task that overruns its execution_timeout."""
import datetime
import time

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_timeout"})
def outpost_timeout():
    @task(execution_timeout=datetime.timedelta(seconds=3))
    def slow():
        time.sleep(60)

    slow()


outpost_timeout()
