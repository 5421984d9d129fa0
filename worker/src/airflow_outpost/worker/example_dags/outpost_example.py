"""The smallest tour of what an outpost worker does for a DAG.

extract -> transform (mapped, one task per shard) -> summarize, passing XCom between tasks and
reading a Variable that exists only on the worker (AIRFLOW_VAR_OUTPOST_REGION).
"""

from __future__ import annotations

import datetime
import os
import platform

from airflow.sdk import Variable, dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, tags=["outpost", "example"])
def outpost_example():
    @task
    def extract() -> list[list[int]]:
        return [list(range(i * 10, i * 10 + 10)) for i in range(6)]

    @task
    def transform(shard: list[int]) -> dict:
        return {"n": len(shard), "sum": sum(shard), "host": platform.node(), "pid": os.getpid()}

    @task
    def summarize(parts) -> dict:
        parts = list(parts)
        return {
            "shards": len(parts),
            "rows": sum(p["n"] for p in parts),
            "total": sum(p["sum"] for p in parts),
            "region": Variable.get("outpost_region", default="unset"),
        }

    summarize(transform.expand(shard=extract()))


outpost_example()
