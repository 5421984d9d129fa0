"""The worker survives its own errors (issue #24 item 2), against a real control plane.

An in-process worker whose heartbeats raise an unexpected error several times, then lose their
registration (404) and meet edge3's 409 when registering again, keeps running its task, reports
it, counts each failure by step in /metrics and status.json, and drains and signs off as usual.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.runtime.worker import Worker
from airflow_outpost.worker.testing.controlplane import ControlPlane


class FlakyHeartbeats(httpx.AsyncBaseTransport):
    """The real transport, except that the next ``fail`` heartbeats raise, then (``lose``) one 404."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fail = 0
        self.lose = False
        self.raised = 0
        self.registers_after_loss = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        heartbeat = request.method == "PATCH" and "/edge_worker/v1/worker/" in request.url.path
        if heartbeat and self.fail > 0:
            self.fail -= 1
            self.raised += 1
            raise RuntimeError("injected: the heartbeat blew up")
        if heartbeat and self.lose:
            self.lose = False
            return httpx.Response(404, json={"detail": "injected: worker not found"}, request=request)
        if request.method == "POST" and "/edge_worker/v1/worker/" in request.url.path:
            self.registers_after_loss += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# Slow (about 3 minutes): a real control plane and a worker held through heartbeat faults.
@pytest.mark.slow
def test_heartbeat_errors_and_a_refused_re_register_leave_the_task_running(control_plane: ControlPlane,
                                                                           tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    name = "w-hb-faults"
    s = load_settings({"api_url": control_plane.base_url, "name": name, "queues": "q_sleep",
                       "state_folder": str(tmp_path / "state"), "log_folder": str(tmp_path / "logs"),
                       "dags_folder": str(control_plane.dags_folder), "metrics_port": "0", "gpus": "none",
                       "model_service": "false", "heartbeat_interval_s": "0.5", "poll_interval_s": "1",
                       "drain_timeout_s": "30"},
                      env={"OUTPOST_JWT_SECRET": control_plane.jwt_secret})
    transport = FlakyHeartbeats()
    faults = 4

    async def main() -> tuple[str, int, str, dict]:
        worker = Worker(s, transport=transport)
        run = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 120
        while not worker.link.registered:
            assert not run.done(), run
            assert time.monotonic() < deadline, "not registered"
            await asyncio.sleep(0.1)
        run_id = await asyncio.to_thread(control_plane.trigger, "outpost_sleep",
                                         {"seconds": 40, "marker_dir": str(marker)})
        while not (marker / "0.start").exists():
            assert not run.done(), run
            assert time.monotonic() < deadline + 60, "the task did not start"
            await asyncio.sleep(0.1)
        transport.registers_after_loss = 0
        transport.fail, transport.lose = faults, True
        while transport.fail or transport.lose or transport.registers_after_loss == 0:
            assert not run.done(), run
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a heartbeat after the 409, and a status write
        # Still running its task, and saying what failed.
        assert not run.done(), run
        assert len(worker.jobs.running) == 1 and not (marker / "0.end").exists()
        heartbeat_errors = worker.steps.describe()["heartbeat"]
        metrics = worker.telemetry.render().decode()
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        before = worker.link.last_heartbeat
        for _ in range(200):  # heartbeats again once its backoff (at most 10 s) is over
            if worker.link.last_heartbeat != before:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no heartbeat got through after the faults")
        assert not worker.steps.describe()["heartbeat"]["failing"]
        assert worker.readiness() == (True, "ready")
        state = await asyncio.to_thread(control_plane.wait_for_run, "outpost_sleep", run_id, 120)
        worker.shutdown()
        code = await asyncio.wait_for(run, 90)
        return state, code, metrics, {"errors": heartbeat_errors, "status": status}

    try:
        state, code, metrics, seen = asyncio.run(main())
    finally:
        asyncio.run(transport.aclose())
    assert state == "success"
    assert code == 0
    # Four injected errors, then the 409 of the re-register after the 404: seven, counted by step.
    assert seen["errors"]["total"] == faults + 1, seen
    assert "DuplicateWorkerError" in seen["errors"]["last_error"], seen
    m = re.search(r'outpost_worker_loop_errors_total\{step="heartbeat"\} (\d+)', metrics)
    assert m and int(m.group(1)) == faults + 1, metrics
    assert seen["status"]["loop_errors"]["heartbeat"]["total"] == faults + 1, seen["status"]
    assert seen["status"]["state"] == "running"
    final = json.loads((tmp_path / "state" / "status.json").read_text())
    assert final["state"] == "offline" and final["signed_off"] is True
    assert control_plane.workers()[name]["state"] == "offline"
    assert os.path.exists(marker / "0.end")
