"""Tasks that record when they run: for concurrency, drain and crash tests.

dag_run.conf: {"seconds": float, "count": int, "marker_dir": str}. Each task writes
<marker_dir>/<map_index>.start and .end (with timestamps) so tests can see overlap and completion.
"""
import datetime
import os
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_sleep"}, max_active_tasks=64)
def outpost_sleep():
    @task
    def plan() -> list[int]:
        conf = get_current_context()["dag_run"].conf
        return list(range(int(conf.get("count", 1))))

    @task
    def nap(i: int) -> int:
        conf = get_current_context()["dag_run"].conf
        marker = conf["marker_dir"]
        os.makedirs(marker, exist_ok=True)
        with open(os.path.join(marker, f"{i}.start"), "w") as fh:
            fh.write(f"{time.time()} {os.getpid()}")
        time.sleep(float(conf.get("seconds", 1)))
        with open(os.path.join(marker, f"{i}.end"), "w") as fh:
            fh.write(str(time.time()))
        return i

    nap.expand(i=plan())


outpost_sleep()
