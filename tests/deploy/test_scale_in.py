"""Scale-in never kills a task (README "Autoscaling and Helm").

A worker told to scale in (SIGTERM: a StatefulSet scaled down by KEDA, a Job's pod evicted) while
it runs a 60 s task finishes the task, reports success and only then exits 0. An ephemeral worker
(the chart's ScaledJob mode: ``--exit-when-idle`` with ``--idle-exit-code 0``) exits by itself once
idle for the configured time, with 0: the only exit code a Kubernetes Job counts as success.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.testing.controlplane import ControlPlane


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sigterm_during_a_60s_task_finishes_it_and_reports_success_first(
        control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    # The chart's CPU group: a 120 s drain, well over the task.
    w = start_worker(queues="q_sleep", concurrency=1, extra_args=["--drain-timeout-s", "120", "--metrics-port", "0"])
    marker = tmp_path / "markers"
    run_id = control_plane.trigger("outpost_sleep", conf={"seconds": 60, "count": 1, "marker_dir": str(marker)})
    deadline = time.monotonic() + 180
    while not (marker / "0.start").exists():
        assert time.monotonic() < deadline, w.log()[-3000:]
        time.sleep(0.2)
    started = time.monotonic()
    w.send(signal.SIGTERM)  # scale-in
    assert w.wait(timeout_s=200) == 0, w.log()[-3000:]
    assert time.monotonic() - started >= 50  # it waited for the task, not the other way round
    assert (marker / "0.end").exists()
    # Success was reported before the worker exited: the run is already final, nothing pending.
    [nap] = [ti for ti in control_plane.task_instances("outpost_sleep", run_id) if ti["task_id"] == "nap"]
    assert nap["state"] == "success", nap
    assert control_plane.wait_for_run("outpost_sleep", run_id, timeout_s=60) == "success"
    assert control_plane.workers()[w.name]["state"] == "offline"


def test_idle_ephemeral_worker_exits_0_after_the_configured_idle_time(control_plane: ControlPlane,
                                                                       start_worker) -> None:
    began = time.monotonic()
    w = start_worker(queues="q_scale_idle", extra_args=["--exit-when-idle", "4s", "--idle-exit-code", "0",
                                                        "--metrics-port", "0"])
    registered = time.monotonic()
    assert w.wait(timeout_s=120) == 0, w.log()[-3000:]  # a Job's success
    took = time.monotonic() - registered
    assert took >= 4 - (registered - began), took  # not before the idle time
    assert took < 60, took  # idle time + drain of nothing + sign-off
    assert "signing off and exiting" in w.log()
    assert control_plane.workers()[w.name]["state"] == "offline"


@pytest.mark.parametrize("raw", ["-1", "126", "yes"])
def test_idle_exit_code_is_checked_by_name(raw: str) -> None:
    with pytest.raises(ConfigError, match="idle_exit_code"):
        load_settings(env={"OUTPOST_API_URL": "http://cp:8080", "OUTPOST_JWT_SECRET": "s", "OUTPOST_IDLE_EXIT_CODE": raw})
