"""Reads a Variable and a Connection that exist only in the worker's environment."""
import datetime

from airflow.sdk import BaseHook, Variable, dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_secrets"})
def outpost_secrets():
    @task
    def read() -> dict:
        conn = BaseHook.get_connection("outpost_local_db")
        return {"var": Variable.get("outpost_local_var"), "host": conn.host, "port": conn.port,
                "login": conn.login}

    read()


outpost_secrets()
