"""A task that always fails, with retries: ends failed after the last try."""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_failing", "retries": 2, "retry_delay": datetime.timedelta(seconds=1)})
def outpost_failing():
    @task
    def boom():
        raise RuntimeError("deliberate failure from outpost_failing")

    boom()


outpost_failing()
