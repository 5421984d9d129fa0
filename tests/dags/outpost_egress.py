"""DAGs for the data-sovereignty tests: big XComs, local-only secrets, logs with secrets in them.

Each DAG has its own queue so the tests' workers never take each other's jobs.
"""
import datetime

from airflow.sdk import dag, task

START = datetime.datetime(2024, 1, 1)


@dag(schedule=None, start_date=START, catchup=False, default_args={"queue": "q_egress_xcom", "retries": 0})
def outpost_egress_xcom():
    @task
    def produce(**context) -> list:
        n = int((context["dag_run"].conf or {}).get("n", 700_000))  # ~5 MB as JSON
        return list(range(n))

    @task
    def small() -> dict:
        return {"rows": 3, "ok": True}

    @task
    def consume(values: list, meta: dict) -> dict:
        return {"count": len(values), "sum": sum(values), "last": values[-1], "meta": meta}

    consume(produce(), small())


@dag(schedule=None, start_date=START, catchup=False, default_args={"queue": "q_egress_secrets", "retries": 0})
def outpost_egress_secrets():
    @task
    def uses_local_connection() -> str:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection("outpost_local_db")
        import logging

        logging.getLogger("airflow.task").warning("api_token=tok-%s and key sk-%s for %s", "9" * 12, "a1" * 8, conn.host)
        return conn.host

    @task
    def asks_central_connection() -> str:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection("outpost_central_only").host

    uses_local_connection()
    asks_central_connection()


outpost_egress_xcom()
outpost_egress_secrets()
