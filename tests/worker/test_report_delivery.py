"""Nothing lost (#24): how the outbox's sender and the log shipper answer what a server can say.

httpx.MockTransport stands in for the control plane: these are the answers a real server cannot be
made to give on cue (a 401 twice then a 200, a 422 forever, 503 on ~30 % of log pushes).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import httpx

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.client import EdgeClient
from airflow_outpost.worker.edge.jobs import Job, JobKey
from airflow_outpost.worker.runtime.job_table import RunningJob
from airflow_outpost.worker.runtime.link import ControlPlaneLink
from airflow_outpost.worker.runtime.outbox import Outbox
from airflow_outpost.worker.runtime.reports import ReportSender
from airflow_outpost.worker.runtime.state import StateFolder
from airflow_outpost.worker.runtime.task_logs import LogShipper

SECRET = "s" * 64
A = JobKey("dag", "a", "run1", 1, -1)
B = JobKey("dag", "b", "run1", 1, -1)
_STATE = re.compile(r"/jobs/state/dag/([^/]+)/run1/1/-1/(\w+)$")


class FakeControlPlane:
    """Records what it accepted; ``answer(request)`` returns a status to refuse with, or None to accept."""

    def __init__(self, answer=lambda request: None) -> None:
        self.answer = answer
        self.states: list[tuple[str, str]] = []  # (task_id, state) accepted, in order
        self.logs: list[str] = []  # log chunks accepted, in order
        self.events: list[str] = []  # "log" / "state:<task>:<state>", in order

    def __call__(self, request: httpx.Request) -> httpx.Response:
        status = self.answer(request)
        if status is not None:
            return httpx.Response(status, json={"detail": f"refused with {status}"})
        if (m := _STATE.search(request.url.path)):
            self.states.append((m.group(1), m.group(2)))
            self.events.append(f"state:{m.group(1)}:{m.group(2)}")
        elif "/logs/push/" in request.url.path:
            self.logs.append(json.loads(request.content)["log_chunk_data"])
            self.events.append("log")
        return httpx.Response(200, json={})


def _settings(tmp_path: Path, **flags: str):
    env = {} if "jwt_secret_file" in flags else {"OUTPOST_JWT_SECRET": SECRET}
    return load_settings({"api_url": "http://cp:8080", "request_timeout_s": "2", "state_folder": str(tmp_path / "state"),
                          "log_folder": str(tmp_path / "logs"), **flags}, env=env)


def _sender(settings, server: FakeControlPlane, **kw) -> tuple[ReportSender, EdgeClient]:
    client = EdgeClient(settings, transport=httpx.MockTransport(server))
    outbox = Outbox(settings.state_folder / "outbox.sqlite").open()
    sender = ReportSender(outbox, client=client, settings=settings, link=ControlPlaneLink(queues=None, concurrency=1),
                          sysinfo=dict, retry_base_s=0.02, **kw)
    return sender, client


async def _until(cond, timeout_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_401_is_retried_until_the_server_accepts_the_final_state(tmp_path: Path) -> None:
    # The server's secret rotated first: it refuses our tokens twice, then accepts them.
    refusals = iter([401, 403])
    server = FakeControlPlane(lambda request: next(refusals, None))

    async def main() -> None:
        sender, client = _sender(_settings(tmp_path), server)
        sender.put_job(A, "success")
        sender.start()
        try:
            assert await sender.flush(10)
            assert server.states == [("a", "success")]
            assert sender.failures.get("auth") == 2
            assert sender.outbox.dead_letter_count == 0
        finally:
            await sender.aclose()
            await client.aclose()

    asyncio.run(main())


def test_an_empty_secret_file_mid_rotation_holds_the_report_until_it_is_filled(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("")  # `printf %s new > secret` truncates first: a reader may see it empty
    server = FakeControlPlane()

    async def main() -> None:
        sender, client = _sender(_settings(tmp_path, jwt_secret_file=str(secret_file)), server)
        sender.put_job(A, "failed")
        sender.start()
        try:
            assert await _until(lambda: sender.failures.get("credentials", 0) >= 2)
            assert server.states == [] and sender.depth == 1
            assert sender.describe()["blocked_by"] == "credentials"
            secret_file.write_text(SECRET + "\n")
            assert await sender.flush(10)
            assert server.states == [("a", "failed")]
            assert sender.describe()["blocked_by"] is None
        finally:
            await sender.aclose()
            await client.aclose()

    asyncio.run(main())


def test_a_report_refused_for_good_moves_to_the_dead_letter_table(tmp_path: Path) -> None:
    server = FakeControlPlane(lambda request: 422 if "/jobs/state/dag/a/" in request.url.path else None)

    async def main() -> None:
        sender, client = _sender(_settings(tmp_path), server)
        sender.put_job(A, "success")
        sender.put_job(B, "success")
        sender.start()
        try:
            assert await sender.flush(10)  # empty: delivered or dead-lettered, nothing pending
            assert server.states == [("b", "success")]
            dead = sender.outbox.dead_letters()
            assert [(d["subject"]["task_id"], d["state"]) for d in dead] == [("a", "success")]
            assert "HTTP 422" in str(dead[0]["reason"])
            assert sender.describe()["dead_letters"] == 1
        finally:
            await sender.aclose()
            await client.aclose()
        # Still there after a restart: dead letters are kept, not dropped.
        reopened = Outbox(tmp_path / "state" / "outbox.sqlite").open()
        assert reopened.dead_letter_count == 1 and reopened.depth == 0
        reopened.close()

    asyncio.run(main())


def test_a_job_the_server_keeps_refusing_with_5xx_does_not_block_another_jobs_report(tmp_path: Path) -> None:
    server = FakeControlPlane(lambda request: 503 if "/jobs/state/dag/a/" in request.url.path else None)

    async def main() -> None:
        sender, client = _sender(_settings(tmp_path), server)
        sender.put_job(A, "success")  # queued first, refused forever
        sender.put_job(B, "running")
        sender.put_job(B, "success")
        sender.start()
        try:
            assert await _until(lambda: len(server.states) == 2)
            assert server.states == [("b", "running"), ("b", "success")]  # B's own order kept
            await asyncio.sleep(0.3)
            assert sender.depth == 1 and sender.outbox.final_state(A) == "success"  # A retried, never dropped
            assert sender.outbox.dead_letter_count == 0  # a 5xx may pass: it is not dead-lettered
            assert sender.failures.get("server", 0) >= 2
        finally:
            await sender.aclose()
            await client.aclose()

    asyncio.run(main())


def test_a_multi_megabyte_log_arrives_whole_in_order_once_through_failing_pushes(tmp_path: Path) -> None:
    rng = random.Random(24)
    pushes = {"n": 0, "refused": 0}

    def flaky(request: httpx.Request) -> int | None:
        if "/logs/push/" in request.url.path:
            pushes["n"] += 1
            if rng.random() < 0.3:
                pushes["refused"] += 1
                return 503
        return None

    server = FakeControlPlane(flaky)
    settings = _settings(tmp_path, push_logs="true", push_log_chunk_size="65536")
    log_file = settings.log_folder / "dag" / "a.log"
    log_file.parent.mkdir(parents=True)
    lines = [f"line {i} {'é✓' * (i % 7)} {'x' * rng.randrange(0, 300)}\n" for i in range(30_000)]
    first, rest = "".join(lines[:8000]), "".join(lines[8000:])
    run = RunningJob(Job(A, 1, "default", {}, "dag/a.log", "dag.py"))

    async def main() -> None:
        sender, client = _sender(settings, server)
        shipper = LogShipper(settings, client=client, egress=None,  # type: ignore[arg-type]  # logs=full: no redactor
                             state_folder=StateFolder(settings.state_folder), outbox=sender.outbox)
        sender.before_final = shipper.ship_pending
        try:
            log_file.write_text(first + "partial li")  # a running task: its last line is not complete yet
            for _ in range(5):
                await shipper.push(run)
            log_file.write_text(first + "partial li" + "ne\n" + rest)
            await shipper.push(run, final=True)
            sender.put_job(A, "success")
            sender.start()
            assert await sender.flush(30)
        finally:
            await sender.aclose()
            await client.aclose()

    asyncio.run(main())
    assert len(log_file.read_bytes()) > 4 * 2**20  # beyond the old final push's 8-chunk cap
    assert "".join(server.logs) == log_file.read_text()  # whole, in order, nothing twice
    assert pushes["refused"] > 5  # the fault was sent
    assert server.events[-1] == "state:a:success" and server.events.count("state:a:success") == 1


def test_dead_letters_and_auth_waits_show_in_outpost_status_and_metrics(tmp_path: Path, capsys) -> None:
    from airflow_outpost.worker.cli.main import main
    from airflow_outpost.worker.observability.prometheus import WorkerMetrics, WorkerSnapshot

    folder = tmp_path / "state"
    box = Outbox(folder / "outbox.sqlite").open()
    seq = box.put(A, "success")
    box.bury(next(r for r in box.pending() if r.seq == seq), "PATCH ... -> HTTP 422: bad state")
    box.put(B, "failed")
    box.close()
    (folder / "status.json").write_text(json.dumps({
        "pid": 1, "name": "w1", "api_url": "http://cp:8080", "state": "offline", "updated": 0, "queues": None,
        "concurrency": 1, "free_slots": 1, "jobs": []}))
    main(["status", "--state-folder", str(folder)])
    out = capsys.readouterr().out
    assert "outbox: 1 report(s) pending, 1 dead-lettered" in out
    assert "dead letter: dag a run1 1 -1 success: PATCH ... -> HTTP 422: bad state" in out
    main(["status", "--json", "--state-folder", str(folder)])
    shown = json.loads(capsys.readouterr().out)["outbox"]
    assert shown["dead_letters"] == 1 and shown["dead_letter_recent"][0]["state"] == "success"

    reports = {"dead_letters": 1, "failures": {"auth": 3}, "blocked_by": "auth"}
    metrics = WorkerMetrics(lambda: WorkerSnapshot(
        state="idle", reachable=True, concurrency=1, free_slots=1, running_queues=(), live=(), outbox_depth=1,
        requests_total=0, request_rates={}, gpus_total=0, gpus_free=0, gpu_devices=(), ray=None, reports=reports))
    text = metrics.render().decode()
    assert "outpost_dead_letter_reports 1.0" in text
    assert 'outpost_report_delivery_failures_total{reason="auth"} 3.0' in text
    assert 'outpost_report_delivery_blocked{reason="auth"} 1.0' in text
