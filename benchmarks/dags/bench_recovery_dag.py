"""DAG for the recovery benchmark: tasks that finish while the control plane's API server is down.

conf: {"count": int, "marker_dir": str}. Each mapped task writes <marker_dir>/<i>.started, waits
(at most 300 s) for <marker_dir>/release, then returns a value: its XCom and final state are sent
while the API server is away, so the worker's gateway holds them until it returns.
"""
import datetime
import os
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "bench_recovery", "retries": 0}, max_active_tasks=64)
def bench_recovery():
    @task
    def plan() -> list[int]:
        return list(range(int(get_current_context()["dag_run"].conf.get("count", 2))))

    @task
    def finish_in_the_dark(i: int) -> int:
        marker = get_current_context()["dag_run"].conf["marker_dir"]
        open(os.path.join(marker, f"{i}.started"), "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(marker, "release")):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.1)
        return i

    finish_in_the_dark.expand(i=plan())


bench_recovery()
