"""``outpost scaler`` against the real control plane, read as KEDA's metrics-api scaler reads it.

The value is ``valueLocation`` ``queues.gpu.workers`` of ``/scale?concurrency=4``, evaluated with the
GJSON subset KEDA uses: 30 tasks queued on ``gpu`` and no worker -> 8; real workers take tasks and
it follows them down to 0; with the API server down the scaler answers 503 (KEDA holds) and
/healthz says why.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.gjson import keda_metric_value
from airflow_outpost.worker.testing.scaler_process import ScalerProc

VALUE_LOCATION = "queues.gpu.workers"
SCALE = "/scale?concurrency=4"


def _wait_value(scaler: ScalerProc, predicate, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        status, last = scaler.get(SCALE)
        if status == 200 and predicate(keda_metric_value(last, VALUE_LOCATION), last):
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout_s}s; last answer {last}\n{scaler.log()[-2000:]}")


def test_scaler_value_follows_the_gpu_backlog_and_fails_while_the_api_server_is_down(
        control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    scaler = ScalerProc(control_plane, tmp_path, "--queues", "gpu", "--refresh-interval-s", "1",
                        "--stale-after-s", "0").start()
    try:
        # Before any backlog: the listed queue is there, at 0 (KEDA may scale to zero on it).
        _wait_value(scaler, lambda v, _: v == 0, 30, "empty queue reads 0")
        run = control_plane.trigger("outpost_scaler", conf={"seconds": 2})
        doc = _wait_value(scaler, lambda v, d: d["queues"]["gpu"]["queued"] == 30, 120, "30 tasks queued")
        assert keda_metric_value(doc, VALUE_LOCATION) == 8  # ceil(30 / 4)
        assert doc["queues"]["gpu"]["slots"] == 30 and doc["queues"]["gpu"]["running"] == 0
        # Another ScaledObject's concurrency, same cached numbers.
        assert keda_metric_value(scaler.get("/scale?concurrency=16")[1], VALUE_LOCATION) == 2

        # Real workers, not serving GPU slots (no GPU here), take the tasks; the value follows.
        args = ["--gpu-queues", "gpu_with_devices*", "--metrics-port", "0"]
        for _ in range(2):
            start_worker(queues="gpu", concurrency=4, extra_args=args)
        seen: list[tuple[float, int, int]] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status, doc = scaler.get(SCALE)
            assert status == 200, doc
            q = doc["queues"]["gpu"]
            value = keda_metric_value(doc, VALUE_LOCATION)
            assert value == math.ceil((q["queued_slots"] + q["running_slots"]) / 4)
            assert q["running"] <= 8  # two workers of four slots
            seen.append((value, q["queued"], q["running"]))
            if value == 0:
                break
            time.sleep(0.5)
        assert control_plane.wait_for_run("outpost_scaler", run, timeout_s=120) == "success"
        values = [v for v, _, _ in seen]
        assert values[-1] == 0, seen
        assert any(r > 0 for _, _, r in seen), f"never saw a running task: {seen}"
        assert any(0 < v < 8 for v in values), f"the value never followed the workers down: {seen}"

        # The control plane's API server goes away: KEDA gets a failure, /healthz says why.
        control_plane.kill_api_server()
        try:
            deadline = time.monotonic() + 30
            while (status := scaler.get(SCALE)[0]) == 200 and time.monotonic() < deadline:
                time.sleep(0.3)
            status, body = scaler.get(SCALE)
            assert status == 503 and "control plane unreachable" in body["error"], body
            status, why = scaler.get("/healthz")
            assert status == 503 and "control plane unreachable since" in why and "ConnectError" in why, why
            _, metrics = scaler.get("/metrics")
            assert "outpost_scaler_up 0.0" in metrics
        finally:
            control_plane.start_api_server()
        _wait_value(scaler, lambda v, _: v == 0, 60, "back once the API server is")
        assert scaler.get("/healthz")[0] == 200
    finally:
        scaler.stop()
