"""DAGs for the fault suite: exactly-once accounting, noisy logs, forking, stubborn and adopted tasks."""
import datetime
import os
import signal
import subprocess
import sys
import time

from airflow.sdk import dag, get_current_context, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_once"}, max_active_tasks=256)
def outpost_exactly_once():
    """conf: {"count": int, "marker_dir": str}. Each execution appends its pid to marker_dir/<i>."""

    @task
    def plan() -> list[int]:
        return list(range(int(get_current_context()["dag_run"].conf.get("count", 10))))

    @task
    def once(i: int) -> int:
        marker = get_current_context()["dag_run"].conf["marker_dir"]
        with open(os.path.join(marker, str(i)), "a") as fh:
            fh.write(f"{os.getpid()} {os.environ.get('OUTPOST_WORKER_NAME')}\n")
        return i

    once.expand(i=plan())


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "q_noisy"})
def outpost_noisy():
    @task
    def shout() -> int:
        line = "x" * 99
        for _ in range(int(get_current_context()["dag_run"].conf.get("lines", 1_000_000))):
            print(line)
        return 1

    shout()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "q_forker"})
def outpost_forker():
    """Leaves a child running (same session) and a detached grandchild (new session), then exits."""

    @task
    def fork_and_leave() -> list[int]:
        marker = get_current_context()["dag_run"].conf["marker_dir"]
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        with open(os.path.join(marker, "pids"), "w") as fh:
            fh.write(f"{child.pid} {detached.pid}")
        return [child.pid, detached.pid]

    fork_and_leave()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "q_stubborn"})
def outpost_stubborn():
    @task
    def ignore_sigterm() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        marker = get_current_context()["dag_run"].conf["marker_dir"]
        open(os.path.join(marker, "started"), "w").close()
        time.sleep(300)

    ignore_sigterm()


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_adopt", "retries": 0}, max_active_runs=4)
def outpost_adopt():
    """conf: {"marker_dir": str, "fail": bool}. Appends one line per execution to marker_dir/runs,
    writes marker_dir/started, waits (at most 180 s) until marker_dir/release exists, so a test
    can crash and restart the worker meanwhile, then returns a value (or raises if "fail")."""

    @task
    def outlive() -> dict:
        conf = get_current_context()["dag_run"].conf
        marker = conf["marker_dir"]
        with open(os.path.join(marker, "runs"), "a") as fh:
            fh.write(f"{os.getpid()} {os.environ.get('OUTPOST_WORKER_NAME')}\n")
        with open(os.path.join(marker, "started"), "w") as fh:
            fh.write(str(os.getpid()))
        deadline = time.monotonic() + 180
        while not os.path.exists(os.path.join(marker, "release")):
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.2)
        if conf.get("fail"):
            raise RuntimeError("deliberate failure after the worker restarted")
        return {"outlived": "the worker", "pid": os.getpid()}

    outlive()


outpost_exactly_once()
outpost_noisy()
outpost_forker()
outpost_stubborn()
outpost_adopt()
