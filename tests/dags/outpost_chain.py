"""A chain passing XCom values from task to task."""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_chain"})
def outpost_chain():
    @task
    def start() -> dict:
        return {"n": 20, "word": "outpost"}

    @task
    def double(payload: dict) -> dict:
        return {**payload, "n": payload["n"] * 2}

    @task
    def describe(payload: dict) -> str:
        return f"{payload['word']}:{payload['n']}"

    describe(double(start()))


outpost_chain()
