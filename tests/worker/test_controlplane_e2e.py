"""End-to-end: a real control plane dispatches DAGs to a real ``outpost worker`` process.

Each DAG uses its own queue so a test's worker never picks up another test's leftovers.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane, free_port
from airflow_outpost.worker.testing.worker_process import run_outpost

pytestmark = pytest.mark.controlplane


def _wait_for(path: Path, w, timeout_s: float = 90) -> None:
    """Wait until a task created ``path`` (the worker's log in the failure message)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, w.log()
        time.sleep(0.2)


def _run(cp: ControlPlane, dag_id: str, conf: dict | None = None, timeout_s: float = 180) -> tuple[str, str]:
    run_id = cp.trigger(dag_id, conf=conf)
    return run_id, cp.wait_for_run(dag_id, run_id, timeout_s=timeout_s)


def test_chain_passes_xcom(control_plane: ControlPlane, start_worker) -> None:
    start_worker(queues="q_chain")
    run_id, state = _run(control_plane, "outpost_chain")
    assert state == "success", control_plane.task_states("outpost_chain", run_id)
    assert control_plane.xcom("outpost_chain", run_id, "double") == {"n": 40, "word": "outpost"}
    assert control_plane.xcom("outpost_chain", run_id, "describe") == "outpost:40"


def test_fresh_interpreter_per_task_mode(control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_chain", extra_args=["--prewarm", "0"])
    run_id, state = _run(control_plane, "outpost_chain")
    assert state == "success", control_plane.task_states("outpost_chain", run_id)
    assert control_plane.xcom("outpost_chain", run_id, "describe") == "outpost:40"
    assert not (w.state_folder / "task-output" / "zygote.log").exists()


def test_dynamic_mapping_over_dozens_of_items(control_plane: ControlPlane, start_worker) -> None:
    start_worker(queues="q_mapped", concurrency=4)
    run_id, state = _run(control_plane, "outpost_mapped", timeout_s=300)
    states = control_plane.task_states("outpost_mapped", run_id)
    assert state == "success", states
    assert sum(1 for k in states if k.startswith("square[")) == 36
    assert control_plane.xcom("outpost_mapped", run_id, "square", map_index=7) == 49
    assert control_plane.xcom("outpost_mapped", run_id, "total") == sum(x * x for x in range(36))


def test_failing_task_retries_then_fails(control_plane: ControlPlane, start_worker) -> None:
    port = free_port()
    w = start_worker(queues="q_failing", extra_args=["--metrics-port", str(port)])
    run_id, state = _run(control_plane, "outpost_failing")
    assert state == "failed"
    [ti] = control_plane.task_instances("outpost_failing", run_id)
    assert ti["state"] == "failed"
    assert ti["try_number"] == 3  # 1 try + 2 retries
    logs = sorted(w.log_folder.rglob("*.log"))
    assert len([p for p in logs if "outpost_failing" in str(p)]) == 3
    assert "deliberate failure from outpost_failing" in logs[-1].read_text()
    # The supervisor exits 0 after each failed try; the worker says what the task reported.
    log = w.wait_for_log(r"job outpost_failing\.boom run=\S+ try=\d ended failed")
    assert len(re.findall(r"job outpost_failing\.boom run=\S+ try=\d ended up_for_retry", log)) == 2, log[-3000:]
    assert len(re.findall(r"job outpost_failing\.boom run=\S+ try=\d ended failed", log)) == 1, log[-3000:]
    assert "outpost_failing.boom" not in "".join(line for line in log.splitlines() if "succeeded" in line)
    deadline = time.monotonic() + 15  # status.json is rewritten about once a second
    while (finished := (w.status() or {}).get("finished", {}).get("task")) != {"up_for_retry": 2, "failed": 1}:
        assert time.monotonic() < deadline, finished
        time.sleep(0.3)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'outpost_jobs_total{queue="q_failing",state="failed"} 1.0' in metrics
    assert 'outpost_jobs_total{queue="q_failing",state="up_for_retry"} 2.0' in metrics
    assert 'outpost_workloads_total{kind="task",state="failed"} 1.0' in metrics
    assert 'state="success"' not in "".join(line for line in metrics.splitlines() if "q_failing" in line)


def test_variable_and_connection_from_worker_env_only(control_plane: ControlPlane, start_worker) -> None:
    env = {
        "AIRFLOW_VAR_OUTPOST_LOCAL_VAR": "only-on-the-worker",
        "AIRFLOW_CONN_OUTPOST_LOCAL_DB": "postgres://alice:pw@db.region.local:5433/warehouse",
    }
    start_worker(queues="q_secrets", env=env)
    run_id, state = _run(control_plane, "outpost_secrets")
    assert state == "success", control_plane.task_states("outpost_secrets", run_id)
    assert control_plane.xcom("outpost_secrets", run_id, "read") == {
        "var": "only-on-the-worker", "host": "db.region.local", "port": 5433, "login": "alice"}
    # And the control plane itself does not have them.
    assert control_plane.api.get("/variables/outpost_local_var").status_code == 404
    assert control_plane.api.get("/connections/outpost_local_db").status_code == 404


def test_execution_timeout_fails_task(control_plane: ControlPlane, start_worker) -> None:
    start_worker(queues="q_timeout")
    t0 = time.monotonic()
    run_id, state = _run(control_plane, "outpost_timeout")
    assert state == "failed"
    assert time.monotonic() - t0 < 55  # killed by the 3 s timeout, not the task's 60 s sleep
    [ti] = control_plane.task_instances("outpost_timeout", run_id)
    assert ti["state"] == "failed"


def _intervals(marker: Path) -> list[tuple[float, float]]:
    out = []
    for start in marker.glob("*.start"):
        end = start.with_suffix(".end")
        out.append((float(start.read_text().split()[0]), float(end.read_text())))
    return out


def test_concurrency_never_exceeds_slots(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_sleep", concurrency=3)
    marker = tmp_path / "markers"
    run_id, state = _run(control_plane, "outpost_sleep", conf={"seconds": 1.5, "count": 9, "marker_dir": str(marker)})
    assert state == "success"
    intervals = _intervals(marker)
    assert len(intervals) == 9
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 3
    assert peak >= 2  # it did run tasks in parallel
    assert w.status()["concurrency"] == 3


def test_memory_merge_opts_every_task_process_in_to_ksm(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    """``--memory-merge true``: each task's supervisor opts itself in to KSM and its task process
    inherits it (the kernel's own ``/proc/<pid>/ksm_stat`` says so); the worker and the zygote are
    not opted in. Whether pages are merged is up to the host's ksmd; the
    benchmark measures that (benchmarks/README.md "Memory merging")."""
    import psutil

    from airflow_outpost.worker.processes import memory_merge

    w = start_worker(queues="q_sleep", concurrency=2, extra_args=["--memory-merge", "true"])
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 4, "count": 2, "marker_dir": str(marker)})
    for i in (0, 1):
        _wait_for(marker / f"{i}.start", w)
        task_pid = int((marker / f"{i}.start").read_text().split()[1])
        supervisor = psutil.Process(task_pid).parent()
        assert supervisor is not None and "outpost task:" in " ".join(supervisor.cmdline())
        for pid in (task_pid, supervisor.pid):
            assert "ksm_merge_any: yes" in Path(f"/proc/{pid}/ksm_stat").read_text(), pid
    zygote = supervisor.ppid()  # not opted in: nothing of the worker's is scanned while no task runs
    for pid in (w.proc.pid, zygote):
        assert "ksm_merge_any: no" in Path(f"/proc/{pid}/ksm_stat").read_text(), pid
    merge = w.status()["memory_merge"]  # what `outpost status` shows
    assert merge["ksm_running"] == memory_merge.host_running() and isinstance(merge["merged_mib"], float)
    shown = run_outpost("status", "--state-folder", str(w.state_folder)).stdout
    assert re.search(r"memory merge: on, [0-9.]+ MiB of running tasks' pages merged \(KSM ", shown), shown
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=90) == "success"


def test_drain_on_sigterm_lets_running_task_finish(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_sleep", concurrency=2)
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 6, "count": 1, "marker_dir": str(marker)})
    _wait_for(marker / "0.start", w)
    assert w.stop(signal.SIGTERM) == 0
    assert (marker / "0.end").exists()  # the task ran to completion during the drain
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=60) == "success"
    assert control_plane.workers()[w.name]["state"] == "offline"
    assert re.search(r"draining \d+ job\(s\) for up to 60s", w.log())


def test_sigkill_mid_task_never_reports_success_and_restart_serves(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_sleep", concurrency=2)
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 20, "count": 1, "marker_dir": str(marker)})
    _wait_for(marker / "0.start", w)
    task_pid = int((marker / "0.start").read_text().split()[1])
    w.send(signal.SIGKILL)
    w.wait(10)
    # The task dies with its worker (it is not left running unsupervised)...
    deadline = time.monotonic() + 20
    while _alive(task_pid):
        assert time.monotonic() < deadline, "task process outlived the SIGKILLed worker"
        time.sleep(0.2)
    assert not (marker / "0.end").exists()
    # ...and a restarted worker (same name and state folder) reports it failed, then serves new work.
    w2 = start_worker(queues="q_sleep", concurrency=2, name=w.name, state_folder=w.state_folder)
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=120) == "failed"
    [nap] = [ti for ti in control_plane.task_instances("outpost_sleep", run_id) if ti["task_id"] == "nap"]
    assert nap["state"] != "success"
    marker2 = tmp_path / "markers2"
    _, state = _run(control_plane, "outpost_sleep", conf={"seconds": 0.5, "count": 2, "marker_dir": str(marker2)})
    assert state == "success"
    assert w2.proc is not None and w2.proc.poll() is None


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    return True


def test_maintenance_mode_from_server_stops_fetching(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_sleep", concurrency=2)
    control_plane.set_worker_maintenance(w.name, True, "disk swap")
    deadline = time.monotonic() + 30
    while not (w.status() or {}).get("maintenance"):
        assert time.monotonic() < deadline, w.log()
        time.sleep(0.3)
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 0.1, "count": 1, "marker_dir": str(marker)})
    time.sleep(8)
    assert not marker.exists(), "a worker in maintenance mode must not start tasks"
    assert control_plane.workers()[w.name]["state"] == "maintenance mode"
    assert "disk swap" in (w.status()["maintenance_comments"] or "")
    control_plane.set_worker_maintenance(w.name, False)
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=90) == "success"
    assert not w.status()["maintenance"]


def test_server_side_concurrency_queue_and_shutdown_requests(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_nothing_here", concurrency=2)
    control_plane.set_worker_concurrency(w.name, 3)
    control_plane.add_worker_queue(w.name, "q_chain")
    deadline = time.monotonic() + 30
    while not ((w.status() or {}).get("concurrency") == 3 and "q_chain" in ((w.status() or {}).get("queues") or [])):
        assert time.monotonic() < deadline, w.status()
        time.sleep(0.3)
    run_id, state = _run(control_plane, "outpost_chain")  # served only because the server added q_chain
    assert state == "success"
    control_plane.request_worker_shutdown(w.name)
    assert w.wait(60) == 0
    assert "shutdown requested by the control plane" in w.log()
    assert control_plane.workers()[w.name]["state"] in ("offline", "unknown")


def test_push_logs_ships_task_logs_to_the_control_plane(control_plane: ControlPlane, start_worker) -> None:
    start_worker(queues="q_chain", extra_args=["--push-logs", "true"])
    run_id, state = _run(control_plane, "outpost_chain")
    assert state == "success"
    # The worker ships the last chunk once the task process has exited, which can be just after
    # the control plane marked the run done: wait for it (bounded).
    deadline = time.monotonic() + 30
    while "Returned value was" not in (log := control_plane.task_log("outpost_chain", run_id, "describe")):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.5)


def test_second_signal_skips_the_drain_wait(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    w = start_worker(queues="q_sleep", concurrency=2)
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 120, "count": 1, "marker_dir": str(marker)})
    _wait_for(marker / "0.start", w)
    w.send(signal.SIGTERM)
    time.sleep(1)
    assert w.proc is not None and w.proc.poll() is None  # first signal: draining (drain timeout is 60 s)
    t0 = time.monotonic()
    w.send(signal.SIGTERM)
    assert w.wait(45) == 0  # second signal: SIGTERM, 5 s grace, SIGKILL, report, exit
    assert time.monotonic() - t0 < 45
    assert not (marker / "0.end").exists()
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=90) == "failed"
    assert "SIGKILL" in w.log()
