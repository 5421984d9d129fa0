"""A one-task DAG on the default queue, for the deployment-recipe test (airflow DAG file)."""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False)
def outpost_recipe():
    @task
    def hello() -> str:
        import os

        return f"hello from {os.environ.get('OUTPOST_WORKER_NAME')} uid {os.getuid()}"

    hello()


outpost_recipe()
