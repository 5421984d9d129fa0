"""DAGs for the deploy tests (metrics, GPU slots, budgets), each on its own queue.

dag_run.conf: {"marker_dir": str, "seconds": float}. Tasks write <marker_dir>/<task_id>.json with
their CUDA_VISIBLE_DEVICES, pool_slots and start/end timestamps.
"""
import datetime
import json
import os
import time

from airflow.sdk import dag, get_current_context, task

START = datetime.datetime(2024, 1, 1)


def _mark(name: str, slots: int) -> None:
    conf = get_current_context()["dag_run"].conf
    marker = conf["marker_dir"]
    os.makedirs(marker, exist_ok=True)
    start = time.time()
    time.sleep(float(conf.get("seconds", 1)))
    record = {"task": name, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "slots": slots,
              "start": start, "end": time.time()}
    with open(os.path.join(marker, f"{name}.json"), "w") as fh:
        json.dump(record, fh)


@dag(schedule=None, start_date=START, catchup=False, default_args={"queue": "gpu_e2e"}, max_active_tasks=16)
def outpost_gpu():
    for name, slots in (("one_a", 1), ("one_b", 1), ("one_c", 1), ("two_a", 2), ("two_b", 2), ("three", 3)):
        @task(task_id=name, pool_slots=slots)
        def run(name=name, slots=slots) -> None:
            _mark(name, slots)

        run()


@dag(schedule=None, start_date=START, catchup=False, default_args={"queue": "q_deploy_metrics"})
def outpost_metrics():
    @task
    def embed() -> int:
        from airflow_outpost.runners.metrics_report import report

        time.sleep(float(get_current_context()["dag_run"].conf.get("seconds", 1)))
        report("embeddings", 512, {"model": "test"})
        report("rows", 100)
        return 512

    embed()


def _budget_dag(dag_id: str, queue: str):
    @dag(dag_id=dag_id, schedule=None, start_date=START, catchup=False, default_args={"queue": queue})
    def budget():
        @task
        def spend() -> str:
            _mark(dag_id, 1)
            return queue

        spend()

    return budget()


_budget_dag("outpost_budget_a", "q_budget_a")
_budget_dag("outpost_budget_b", "q_budget_b")
outpost_gpu()
outpost_metrics()
