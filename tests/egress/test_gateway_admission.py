"""The gateway forwards only the Task Execution API, and only for the tries this worker runs.

Sent as an attacker would: raw HTTP over a socket (an HTTP client would remove the dot segments
before sending), and requests carrying no token or another try's token. The upstream is a fake
control plane (``httpx.MockTransport``) that answers whatever reaches it, like the real Edge API
answered ``/execution/../edge_worker/v1/health`` before the gateway refused dot segments.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from airflow_outpost.worker.egress.gateway import Egress
from tests.egress.test_gateway import _settings, _token

OURS = "0190f0f0-0000-7000-8000-0000000000a1"
THEIRS = "0190f0f0-0000-7000-8000-0000000000b2"  # a try this worker does not run


async def _raw_request(url: str, request_line: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """Send one HTTP/1.1 request exactly as written (dots and escapes kept); the status and body."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    head = [request_line, f"Host: {where.hostname}:{where.port}", "Connection: close", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[-1]


def _refused_rows(tmp_path: Path) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(tmp_path / "state" / "egress.sqlite")
    try:
        return db.execute("SELECT endpoint, outcome, status FROM egress WHERE outcome = 'refused' ORDER BY id").fetchall()
    finally:
        db.close()


async def _with_egress(tmp_path: Path, fn, **flags):
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "healthy"})

    egress = Egress(_settings(tmp_path, **flags), upstream_transport=httpx.MockTransport(upstream))
    url = await egress.start()
    egress.admit(OURS, "d.t run=r try=1")
    try:
        return await fn(url, egress, seen)
    finally:
        egress.ledger.flush()
        await egress.aclose()


@pytest.mark.parametrize("path", [
    "/execution/../edge_worker/v1/health",
    "/execution/%2e%2e/edge_worker/v1/health",
    "/execution/%2E%2E/edge_worker/v1/health",
    "/execution/.%2e/edge_worker/v1/health",
    "/execution/%2e./edge_worker/v1/health",
    "/execution/task-instances/./../../edge_worker/v1/health",
    "/execution/%252e%252e/edge_worker/v1/health",
    "/execution/..%2fedge_worker/v1/health",
    "/edge_worker/v1/health",
])
def test_paths_with_dot_segments_or_outside_the_execution_api_are_refused_and_ledgered(tmp_path: Path, path: str) -> None:
    """Sent under the gateway's secret prefix (``/execution/`` here stands for it): 400; a path
    outside it is not found (404). Ledgered under ``/execution/``, never the secret."""
    under = path.startswith("/execution/")

    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> None:
        raw = urlsplit(url).path + path.removeprefix("/execution/") if under else path
        status, body = await _raw_request(url, f"GET {raw} HTTP/1.1", {"Authorization": f"Bearer {_token(OURS)}"})
        assert status == (400 if under else 404), body
        assert "outpost gateway" in json.loads(body)["detail"]
        assert seen == []  # nothing reached the control plane

    asyncio.run(_with_egress(tmp_path, fn))
    [(endpoint, outcome, status)] = _refused_rows(tmp_path)
    assert outcome == "refused" and status == (400 if under else 404) and endpoint == path


@pytest.mark.parametrize("auth", [None, "Bearer not-a-jwt", f"Bearer {_token(THEIRS)}"])
def test_a_request_without_a_token_of_a_try_this_worker_runs_is_refused(tmp_path: Path, auth: str | None) -> None:
    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            headers = {"Authorization": auth} if auth else {}
            r = await client.get("variables/api_key", headers=headers)
            assert r.status_code in (401, 403) and "outpost gateway" in r.json()["detail"]
            assert seen == []
            # The same request with the token of a try this worker runs goes through.
            r = await client.get("variables/api_key", headers={"Authorization": f"Bearer {_token(OURS)}"})
            assert r.status_code == 200 and len(seen) == 1

    asyncio.run(_with_egress(tmp_path, fn))
    [(endpoint, outcome, _status)] = _refused_rows(tmp_path)
    assert endpoint == "/execution/variables/api_key" and outcome == "refused"


def test_a_try_whose_job_ended_is_refused(tmp_path: Path) -> None:
    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> int:
        egress.forget_try(OURS)
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("variables/v", headers={"Authorization": f"Bearer {_token(OURS)}"})
        return r.status_code

    assert asyncio.run(_with_egress(tmp_path, fn)) == 403


def test_a_deferral_with_another_tries_token_is_not_kept(tmp_path: Path) -> None:
    """With local triggers, a deferral PATCH names a try; only that try's own token may defer it."""
    kept: list[tuple[str, str | None]] = []

    def on_deferral(ti_id: str, body: bytes, auth: str | None) -> bool:
        kept.append((ti_id, auth))
        return True

    async def main() -> None:
        seen: list[httpx.Request] = []
        egress = Egress(_settings(tmp_path, triggers="local"), on_deferral=on_deferral,
                        upstream_transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(204)))
        url = await egress.start()
        other = "0190f0f0-0000-7000-8000-0000000000c3"
        egress.admit(OURS, "d.t run=r try=1")
        egress.admit(other, "d.u run=r try=1")  # another task running on this worker
        deferral = {"state": "deferred", "classpath": "x.Trigger", "trigger_kwargs": {}, "next_method": "execute_complete"}
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                for auth in (None, f"Bearer {_token(other)}", f"Bearer {_token(THEIRS)}"):
                    r = await client.patch(f"task-instances/{OURS}/state", json=deferral,
                                           headers={"Authorization": auth} if auth else {})
                    assert r.status_code in (401, 403), (auth, r.status_code)
                assert kept == [] and seen == []
                r = await client.patch(f"task-instances/{OURS}/state", json=deferral,
                                       headers={"Authorization": f"Bearer {_token(OURS)}"})
                assert r.status_code == 204 and kept == [(OURS, f"Bearer {_token(OURS)}")] and seen == []
        finally:
            egress.ledger.flush()
            await egress.aclose()

    asyncio.run(main())
    assert len(_refused_rows(tmp_path)) == 3
