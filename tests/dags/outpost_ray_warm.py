"""Two tasks in a row use the worker's Ray: the second finds the actor the first left warm.

Each task joins the Ray its worker gives it (``RayConfig.from_env()``; a local Ray of its own
when the worker gives none) and visits a named detached actor, creating it if it is missing.
"""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_ray"})
def outpost_ray_warm():
    @task
    def visit() -> dict:
        import os

        import ray

        from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

        with ray_session(RayConfig.from_env(num_cpus=1)) as info:
            @ray.remote
            class Counter:
                def __init__(self) -> None:
                    self.n = 0

                def visit(self) -> tuple[int, int]:
                    self.n += 1
                    return self.n, os.getpid()

            try:
                counter, made = ray.get_actor("outpost-ray-warm", namespace="outpost-tests"), False
            except ValueError:
                counter = Counter.options(name="outpost-ray-warm", namespace="outpost-tests", lifetime="detached").remote()
                made = True
            visits, actor_pid = ray.get(counter.visit.remote())
        return {"address": info["address"], "started": info["started"], "made": made, "visits": visits,
                "actor_pid": actor_pid, "keep_warm_s": os.environ.get("OUTPOST_RAY_KEEP_WARM_S")}

    visit.override(task_id="first")() >> visit.override(task_id="second")()


outpost_ray_warm()
