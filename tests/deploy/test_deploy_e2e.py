"""Deploy features against a real control plane and real ``outpost worker`` processes.

Each test uses its own queue (see tests/dags/outpost_deploy.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from airflow_outpost.worker.testing.controlplane import ControlPlane, free_port
from airflow_outpost.worker.testing.worker_process import run_outpost

pytestmark = pytest.mark.controlplane


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_scraped_during_a_real_run(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    port = free_port()
    w = start_worker(queues="q_deploy_metrics", extra_args=["--metrics-port", str(port)])
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/healthz").status_code == 200
    _wait(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, "/readyz 200")
    before = _scrape(url)
    assert before.get(("outpost_jobs_total", (("queue", "q_deploy_metrics"), ("state", "success")))) is None
    run_id = control_plane.trigger("outpost_metrics", conf={"seconds": 4})
    running = _wait(lambda: (m := _scrape(url)).get(("outpost_jobs_running", (("queue", "q_deploy_metrics"),))) and m,
                    120, "the task to run")
    assert running[("outpost_jobs_total", (("queue", "q_deploy_metrics"), ("state", "fetched")))] == 1
    assert control_plane.wait_for_run("outpost_metrics", run_id, timeout_s=180) == "success"
    # The success is counted when the task ends; its report to the server may still be queued
    # for a moment after, so wait for both before reading the rest.
    after = _wait(lambda: (m := _scrape(url)).get(
        ("outpost_jobs_total", (("queue", "q_deploy_metrics"), ("state", "success"))))
        and m.get(("outpost_pending_reports", ())) == 0 and m, 30, "success counted and reported")
    assert after[("outpost_jobs_total", (("queue", "q_deploy_metrics"), ("state", "running")))] == 1
    assert after[("outpost_task_duration_seconds_count", (("queue", "q_deploy_metrics"),))] == 1
    assert after[("outpost_pickup_latency_seconds_count", (("queue", "q_deploy_metrics"),))] == 1
    assert after[("outpost_runner_embeddings_total", (("model", "test"),))] == 512
    assert after[("outpost_runner_rows_total", ())] == 100
    assert after[("outpost_control_plane_requests_total", ())] > before[("outpost_control_plane_requests_total", ())]
    assert after[("outpost_task_wall_seconds_total", (("dag_id", "outpost_metrics"), ("queue", "q_deploy_metrics")))] > 0
    assert w.status()["metrics_url"] == url


def test_gpu_tasks_get_their_own_devices(control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    marker = tmp_path / "gpu"
    w = start_worker(queues="gpu_e2e", concurrency=1, extra_args=["--gpus", "0,1,2,3"])
    run_id = control_plane.trigger("outpost_gpu", conf={"marker_dir": str(marker), "seconds": 5})
    assert control_plane.wait_for_run("outpost_gpu", run_id, timeout_s=300) == "success", \
        control_plane.task_states("outpost_gpu", run_id)
    records = [json.loads(p.read_text()) for p in marker.glob("*.json")]
    assert len(records) == 6
    for r in records:
        devices = r["cuda"].split(",")
        assert len(devices) == r["slots"], r  # as many GPUs as pool_slots
        assert set(devices) <= {"0", "1", "2", "3"}
    overlapping = 0
    for a in records:
        # Everything running at the moment ``a`` started: disjoint devices, at most 4 in all.
        live = [b for b in records if b["start"] <= a["start"] < b["end"]]
        devices = [d for b in live for d in b["cuda"].split(",")]
        assert len(devices) == len(set(devices)) <= 4, live
        overlapping = max(overlapping, len(live))
    # GPU jobs do not use the single CPU slot: several ran at once.
    assert overlapping >= 2
    # Every device is handed back once the tasks are done.
    _wait(lambda: w.status()["gpus"] == {"total": 4, "free": 4}, 30, "all GPUs free again")


def test_exit_when_idle_signs_off_and_exits_3(control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_deploy_idle", extra_args=["--exit-when-idle", "2s", "--metrics-port", "0"])
    assert w.wait(timeout_s=120) == 3, w.log()[-3000:]  # EXIT_IDLE: a rented box's wrapper powers off on it
    assert "signing off and exiting" in w.log()
    assert "reported offline to the control plane" in w.log()
    assert control_plane.workers()[w.name]["state"] == "offline"


def test_budget_exhaustion_stops_fetching_from_that_queue_only(control_plane: ControlPlane, start_worker,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "budget"
    conf = {"marker_dir": str(marker), "seconds": 2}
    args = ["--budget", "queue:q_budget_a=1s", "--budget", "queue:q_budget_b=1h", "--metrics-port", "0"]
    w = start_worker(queues="q_budget_a,q_budget_b", extra_args=args)
    first = control_plane.trigger("outpost_budget_a", conf=conf)
    assert control_plane.wait_for_run("outpost_budget_a", first, timeout_s=180) == "success"
    # The 2 s task spent queue q_budget_a's 1 s budget.
    _wait(lambda: "q_budget_a" in (w.status() or {}).get("paused_queues", {}), 30, "q_budget_a paused")
    second = control_plane.trigger("outpost_budget_a", conf=conf)
    other = control_plane.trigger("outpost_budget_b", conf=conf)
    assert control_plane.wait_for_run("outpost_budget_b", other, timeout_s=180) == "success"
    assert control_plane.task_states("outpost_budget_a", second) == {"spend": "queued"}
    assert "budget queue:q_budget_a spent" in w.log()
    sysinfo = _wait(lambda: control_plane.workers()[w.name].get("sysinfo", {}).get("budget"), 30,
                    "the heartbeat to carry the budget note")
    assert "queue q_budget_a paused" in sysinfo
    assert w.stop() == 0
    # Raising the budget (a restart with the new setting; the ledger is kept) resumes the queue.
    start_worker(queues="q_budget_a,q_budget_b", name=w.name, state_folder=w.state_folder,
                 extra_args=["--budget", "queue:q_budget_a=1h", "--metrics-port", "0"])
    assert control_plane.wait_for_run("outpost_budget_a", second, timeout_s=180) == "success"


def test_preemption_notice_drains_signs_off_and_exits_4(control_plane: ControlPlane, start_worker,
                                                        tmp_path: Path) -> None:
    notice = tmp_path / "preempted"
    w = start_worker(queues="q_deploy_preempt", extra_args=["--preemption-notice-file", str(notice),
                                                            "--metrics-port", "0"])
    notice.write_text("aws: terminate")
    assert w.wait(timeout_s=60) == 4, w.log()[-3000:]
    assert "preemption notice" in w.log()
    assert control_plane.workers()[w.name]["state"] == "offline"


def test_local_maintenance_and_stop_commands(control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_deploy_local", extra_args=["--metrics-port", "0"])
    folder = ["--state-folder", str(w.state_folder)]
    refused = run_outpost("maintenance", "on", *folder)
    assert refused.returncode == 2 and "--comments is required" in refused.stderr
    on = run_outpost("maintenance", "on", "--comments", "disk swap", "--wait", *folder, timeout_s=90)
    assert on.returncode == 0 and "worker is maintenance mode" in on.stdout, on.stdout + on.stderr
    seen = _wait(lambda: (lambda info: info if info["state"] == "maintenance mode" else None)(
        control_plane.workers()[w.name]), 30, "the control plane to show maintenance")
    assert "disk swap" in (seen.get("maintenance_comments") or "")
    off = run_outpost("maintenance", "off", "--wait", *folder, timeout_s=90)
    assert off.returncode == 0, off.stdout + off.stderr
    _wait(lambda: control_plane.workers()[w.name]["state"] == "idle", 30, "the worker to leave maintenance")
    stop = run_outpost("stop", "--wait", *folder, timeout_s=120)
    assert stop.returncode == 0 and "worker stopped" in stop.stdout, stop.stdout + stop.stderr
    assert w.wait(timeout_s=10) == 0
    assert control_plane.workers()[w.name]["state"] == "offline"
    gone = run_outpost("stop", *folder)
    assert gone.returncode == 1 and "no running worker" in gone.stderr
