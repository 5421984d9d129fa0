"""Twenty parallel tasks that wait for a go signal, for the secret-rotation acceptance test (#24)."""
import datetime
import os
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_rotate", "retries": 1}, max_active_tasks=64)
def outpost_rotation():
    """conf: {"marker_dir": str}. Each task marks ``<i>.started``, waits for ``go`` (up to 10 min),
    appends its pid to ``<i>`` (one line per execution) and returns ``i``."""

    @task
    def finish(i: int) -> int:
        marker = get_current_context()["dag_run"].conf["marker_dir"]
        open(os.path.join(marker, f"{i}.started"), "a").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(os.path.join(marker, "go")) and time.monotonic() < deadline:
            time.sleep(0.2)
        with open(os.path.join(marker, str(i)), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return i

    finish.expand(i=list(range(20)))


outpost_rotation()
