"""Fetched jobs are untrusted: fuzz the parser, and feed hostile jobs to a real in-process Worker
through a fake Edge API (``httpx.MockTransport``: the real server can't be made to send them)."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.jobs import MAX_JOB_BYTES, Job, RejectedJob, parse_job
from airflow_outpost.worker.edge.sysinfo import airflow_version
from airflow_outpost.worker.runtime.worker import Worker
from tests.worker.test_jobs import GOOD

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
PATHS = [("dag_id",), ("task_id",), ("run_id",), ("try_number",), ("map_index",), ("task_instance_id",),
         ("concurrency_slots",), ("command",), ("command", "type"), ("command", "token"), ("command", "log_path"),
         ("command", "dag_rel_path"), ("command", "bundle_info"), ("command", "ti"), ("command", "ti", "id"),
         ("command", "ti", "dag_id"), ("command", "ti", "try_number"), ("command", "ti", "queue")]
HOSTILE_TEXT = st.sampled_from(["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "x\x00y", "a\\..\\b", "", "é" * 300])


def _only_job_or_rejected(raw: Any) -> None:
    try:
        result = parse_job(raw)
    except RejectedJob as exc:
        assert str(exc)
        return
    assert isinstance(result, Job)
    assert not result.log_path.startswith("/") and ".." not in result.log_path.split("/")
    assert not result.dag_rel_path.startswith("/") and ".." not in result.dag_rel_path.split("/")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_fuzz_arbitrary_json(raw: Any) -> None:
    _only_job_or_rejected(raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON | HOSTILE_TEXT), min_size=1, max_size=4))
def test_fuzz_mutated_valid_jobs(mutations: list) -> None:
    job = copy.deepcopy(GOOD)
    for path, value in mutations:
        node = job
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = value
    _only_job_or_rejected(job)


# -- a real Worker against a fake Edge API --------------------------------------------------------

def _job(n: int, **command: Any) -> dict:
    job = copy.deepcopy(GOOD)
    job["run_id"] = job["command"]["ti"]["run_id"] = f"hostile-{n}"
    job["command"].update(command)
    return job


class FakeEdgeApi:
    """Serves a fixed sequence of fetch replies, then "no job"; records state reports."""

    def __init__(self, replies: list[httpx.Response]) -> None:
        self.replies = replies
        self.fetches = 0
        self.fetched_at: list[float] = []  # time.monotonic() of each fetch
        self.reports: list[str] = []
        self.heartbeats = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v2/version":
            return httpx.Response(200, json={"version": airflow_version()})
        if "/jobs/fetch/" in path:
            self.fetches += 1
            self.fetched_at.append(time.monotonic())
            return self.replies.pop(0) if self.replies else httpx.Response(200, content=b"null")
        if "/jobs/state/" in path:
            self.reports.append(path)
            return httpx.Response(204)
        if "/worker/" in path:
            self.heartbeats += request.method == "PATCH"
            return httpx.Response(200, json={"state": "running" if request.method == "PATCH" else "idle"})
        return httpx.Response(404, json={"detail": f"unexpected {path}"})


def test_worker_refuses_hostile_jobs_reports_them_and_keeps_serving(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    outside = tmp_path / "outside"
    outside.mkdir()
    logs.mkdir()
    (logs / "escape").symlink_to(outside, target_is_directory=True)
    replies = [
        httpx.Response(200, json=[1, 2, 3]),                                   # not an object
        httpx.Response(200, content=b"{not json"),                              # malformed JSON
        httpx.Response(200, json={**GOOD, "try_number": "1"}),                  # wrong type, no key
        httpx.Response(200, json=_job(1, log_path="../../etc/passwd")),          # traversal
        httpx.Response(200, json=_job(2, dag_rel_path="/etc/passwd")),           # absolute path
        httpx.Response(200, json=_job(3, log_path="escape/attempt=1.log")),      # symlink escape
        httpx.Response(200, json=_job(4, type="TestConnection")),                # unknown workload
        httpx.Response(200, content=json.dumps({**GOOD, "pad": "x" * (MAX_JOB_BYTES + 10)}).encode()),  # huge
    ]
    fake = FakeEdgeApi(replies)
    s = load_settings({"api_url": "http://cp.invalid:8080", "name": "hostile-w", "state_folder": str(tmp_path / "state"),
                       "log_folder": str(logs), "prewarm": "0", "metrics_port": "0", "gpus": "none",
                       "poll_interval_s": "0.2", "poll_min_interval_s": "0.05", "heartbeat_interval_s": "0.5",
                       "drain_timeout_s": "5"}, env={"OUTPOST_JWT_SECRET": "s" * 32})

    async def main() -> int:
        worker = Worker(s, transport=httpx.MockTransport(fake))
        run = asyncio.create_task(worker.run())
        for _ in range(600):
            if fake.fetches >= 12 and fake.heartbeats >= 2:
                break
            if run.done():
                break
            await asyncio.sleep(0.05)
        worker.shutdown()
        return await asyncio.wait_for(run, 60)

    assert asyncio.run(main()) == 0
    # Jobs whose identity was readable were reported failed so Airflow can act on them.
    failed = [p for p in fake.reports if p.endswith("/failed")]
    assert sorted(re.search(r"hostile-\d", p).group(0) for p in failed) == [f"hostile-{i}" for i in range(1, 5)]
    assert not fake.replies and fake.fetches >= 12, "the worker kept serving after the hostile jobs"
    assert list(outside.iterdir()) == []
    db = sqlite3.connect(tmp_path / "state" / "egress.sqlite")
    rejected = [r[0] for r in db.execute("SELECT rule FROM egress WHERE outcome='rejected' ORDER BY id")]
    assert len(rejected) == 8, rejected
    for fragment in ("not a JSON object", "not JSON", "must be an integer", "escapes its folder", "is absolute",
                     "symlink escape", "unsupported workload type", "exceeds the limit"):
        assert any(fragment in r for r in rejected), (fragment, rejected)
