"""The health/metrics server, alone and wired to a (not started) worker, scraped over real HTTP and parsed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.observability.health import HealthServer
from airflow_outpost.worker.runtime.worker import Worker


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    s = load_settings({"api_url": "http://127.0.0.1:9", "state_folder": str(tmp_path / "state"),
                       "log_folder": str(tmp_path / "logs"), "gpus": "0,1,2,3", "queues": "cpu,gpu",
                       "budgets": "queue:cpu=1s"}, env={})
    return Worker(s)


def test_endpoints_and_metrics(worker: Worker, tmp_path: Path) -> None:
    async def scenario() -> tuple[dict, list[tuple[int, str]]]:
        worker.costs.record(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1, queue="cpu",
                            state="success", started=1e9, ended=1e9 + 5, gpus=0)
        import time
        now = time.time()
        worker.costs.record(dag_id="d", task_id="t2", run_id="r", try_number=1, map_index=-1, queue="cpu",
                            state="success", started=now - 5, ended=now, gpus=0)
        worker.costs.record(dag_id="g", task_id="t", run_id="r", try_number=1, map_index=-1, queue="gpu",
                            state="success", started=now - 10, ended=now, gpus=2)
        worker.budgets.refresh(force=True)
        worker.telemetry.job_event("cpu", "fetched")
        worker.telemetry.job_started("cpu", 0.2)
        worker.telemetry.job_finished("cpu", "success", 3.0)
        worker.gpus.allocate("someone", 3)
        worker.counter.record()
        server = HealthServer("127.0.0.1", 0, readiness=worker.readiness, metrics=worker.telemetry.render)
        await server.start()
        statuses = []
        try:
            async with httpx.AsyncClient(base_url=server.url) as c:
                for path in ("/healthz", "/readyz", "/nope"):
                    r = await c.get(path)
                    statuses.append((r.status_code, r.text))
                worker.link.registered = True
                r = await c.get("/readyz")
                statuses.append((r.status_code, r.text))
                worker.link.mark_unreachable()
                r = await c.get("/readyz")
                statuses.append((r.status_code, r.text))
                statuses.append(((await c.post("/metrics")).status_code, ""))
                r = await c.get("/metrics")
                assert r.headers["content-type"].startswith("text/plain; version=")
                return _samples(r.text), statuses
        finally:
            await server.aclose()
            await server.aclose()
            worker.costs.close()

    m, statuses = asyncio.run(scenario())
    assert statuses == [(200, "ok\n"), (503, "not registered with the control plane yet\n"),
                        (404, "not found: try /healthz, /readyz or /metrics\n"), (200, "ready\n"),
                        (503, "control plane unreachable\n"), (405, "")]
    assert m[("outpost_jobs_total", (("queue", "cpu"), ("state", "success")))] == 1
    assert m[("outpost_jobs_total", (("queue", "cpu"), ("state", "running")))] == 1
    assert m[("outpost_task_duration_seconds_count", (("queue", "cpu"),))] == 1
    assert m[("outpost_pickup_latency_seconds_sum", (("queue", "cpu"),))] == pytest.approx(0.2)
    assert m[("outpost_slots", (("kind", "gpu"), ("state", "free")))] == 1
    assert m[("outpost_slots", (("kind", "gpu"), ("state", "total")))] == 4
    assert m[("outpost_control_plane_requests_total", ())] == 1
    assert m[("outpost_pending_reports", ())] == 0
    assert m[("outpost_task_gpu_seconds_total", (("dag_id", "g"), ("queue", "gpu")))] == pytest.approx(20)
    assert m[("outpost_task_wall_seconds_total", (("dag_id", "d"), ("queue", "cpu")))] == pytest.approx(10)
    assert m[("outpost_budget_spent_seconds", (("budget", "queue:cpu"),))] == pytest.approx(5, abs=0.1)
    assert m[("outpost_queue_paused", (("queue", "cpu"),))] == 1
    assert m[("outpost_control_plane_reachable", ())] == 0


def _server(port: int = 0, ready: tuple[bool, str] = (True, "ready"), body: bytes = b"m 1\n") -> HealthServer:
    return HealthServer("127.0.0.1", port, readiness=lambda: ready, metrics=lambda: body)


def test_health_server_alone_serves_what_it_is_given() -> None:
    def broken() -> bytes:
        raise RuntimeError("collector failed")

    async def scenario() -> list[tuple[int, str]]:
        servers = [_server(ready=(False, "draining")), HealthServer("127.0.0.1", 0, readiness=lambda: (True, "ready"),
                                                                     metrics=broken)]
        out = []
        for server in servers:
            await server.start()
            try:
                async with httpx.AsyncClient(base_url=server.url) as c:
                    for path in ("/readyz", "/metrics"):
                        r = await c.get(path)
                        out.append((r.status_code, r.text))
                    r = await c.head("/healthz")
                    out.append((r.status_code, r.text))
            finally:
                await server.aclose()
        return out

    assert asyncio.run(scenario()) == [
        (503, "draining\n"), (200, "m 1\n"), (200, ""),
        (200, "ready\n"), (500, "metrics collection failed; see the worker log\n"), (200, "")]


def test_port_in_use_is_logged_not_fatal(caplog) -> None:
    async def scenario() -> str | None:
        first = _server()
        await first.start()
        port = int(first.url.rsplit(":", 1)[1])
        second = _server(port)
        await second.start()
        url = second.url
        await first.aclose()
        await second.aclose()
        return url

    assert asyncio.run(scenario()) is None
    assert "cannot listen on 127.0.0.1" in caplog.text


def test_runner_reports_reach_metrics(worker: Worker) -> None:
    folder = worker.telemetry.runner.folder
    code = ("from airflow_outpost.runners.metrics_report import report\n"
            "assert report('embeddings', 512, {'model': 'm'})\n"
            "assert report('embeddings', 256, {'model': 'm'})\n"
            "assert report('rows', 7)\n"
            "assert report('queue_depth', 3, kind='gauge')\n"
            "assert not report('Bad-Name', 1)\n")
    env = {**os.environ, "OUTPOST_METRICS_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    (folder / "999999999.jsonl").write_text('{"name": "rows", "value": 1}\nnot json\n{"name": "rows", "val')
    m = _samples(worker.telemetry.render().decode())
    assert m[("outpost_runner_embeddings_total", (("model", "m"),))] == 768
    assert m[("outpost_runner_rows_total", ())] == 8
    assert m[("outpost_runner_queue_depth", ())] == 3
    assert worker.telemetry.runner.bad_records == 1
    # The writers are gone and their files were read to the end: cleaned up; the partial line waits.
    assert [p.name for p in folder.iterdir()] == ["999999999.jsonl"]
    assert _samples(worker.telemetry.render().decode())[("outpost_runner_embeddings_total", (("model", "m"),))] == 768


def test_report_outside_a_worker_is_a_no_op(monkeypatch) -> None:
    from airflow_outpost.runners.metrics_report import report

    monkeypatch.delenv("OUTPOST_METRICS_DIR", raising=False)
    assert report("rows", 1) is False
