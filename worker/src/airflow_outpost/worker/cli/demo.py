"""``outpost demo``: see a worker run real Airflow tasks with one command.

Starts an embedded control plane (api-server, scheduler, dag-processor on SQLite, loopback
ports, temporary AIRFLOW_HOME) with the shipped example DAGs, starts an ``outpost worker`` process
against it, triggers the example DAG, waits for it, prints each task's state and log file, then
stops the worker (drain) and the control plane. Needs the ``dev`` extra.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from airflow_outpost.worker.testing.controlplane import ControlPlane

EXAMPLE_DAGS = Path(__file__).resolve().parents[1] / "example_dags"  # worker/src/airflow_outpost/worker/example_dags


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(*, keep: bool = False, dag_id: str = "outpost_rag_pipeline", timeout_s: float = 900,
             engine: str | None = None) -> int:
    """Run the demo; return 0 if the DAG run succeeded, 1 otherwise. ``engine`` ("local" or "ray")
    sets the run's ``engine`` param: where the pipeline's runners run (None: the DAG's default)."""
    workdir = Path(tempfile.mkdtemp(prefix="outpost-demo-"))
    cp = ControlPlane(dags_folder=EXAMPLE_DAGS, home=workdir / "airflow")
    worker: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    try:
        _say(f"starting a local Airflow control plane in {workdir / 'airflow'} ...")
        cp.start()
        _say(f"control plane up at {cp.base_url} ({time.monotonic() - t0:.0f}s)")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
        env.update({
            "OUTPOST_JWT_SECRET": cp.jwt_secret, "AIRFLOW_VAR_OUTPOST_REGION": "demo-local",
            "OUTPOST_STORE_ROOT": str(workdir / "store"), "HF_HUB_OFFLINE": "1",
        })
        argv = [sys.executable, "-m", "airflow_outpost", "worker", "--api-url", cp.base_url, "--name", "outpost-demo",
                "--concurrency", "2", "--state-folder", str(workdir / "state"), "--log-folder", str(workdir / "logs"),
                "--dags-folder", str(EXAMPLE_DAGS), "--poll-interval-s", "1"]
        worker_log = workdir / "worker.log"
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        _say(f"worker 'outpost-demo' started (pid {worker.pid}, log {worker_log})")
        run_id = cp.trigger(dag_id, conf={"engine": engine} if engine else None)
        _say(f"triggered {dag_id} run {run_id}; waiting ...")
        state = cp.wait_for_run(dag_id, run_id, timeout_s=timeout_s)
        _say(f"run finished: {state.upper()} in {time.monotonic() - t0:.0f}s total")
        for ti in sorted(cp.task_instances(dag_id, run_id), key=lambda t: (t["start_date"] or "", t["map_index"])):
            name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
            log = workdir / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={ti['task_id']}"
            if ti["map_index"] >= 0:
                log = log / f"map_index={ti['map_index']}"
            log = log / f"attempt={ti['try_number']}.log"
            _say(f"  {name:28} {ti['state']:10} log: {log}")
        try:
            leaf = [t for t in cp.task_instances(dag_id, run_id) if t["map_index"] < 0][-1]["task_id"]
            _say(f"  XCom of {leaf}: {cp.xcom(dag_id, run_id, leaf)}")
        except Exception as exc:  # the XCom display is a nicety; never fail the demo for it
            _say(f"  (could not read XCom: {exc})")
        return 0 if state == "success" else 1
    finally:
        if worker is not None and worker.poll() is None:
            _say("stopping the worker (drain) ...")
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(120)
            except subprocess.TimeoutExpired:
                worker.kill()
        cp.stop()
        _say("control plane stopped" + (f"; files kept in {workdir}" if keep else ""))
        if not keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
