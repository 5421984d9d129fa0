"""The egress gateway rides out an unreachable control plane: requests are held and delivered
when it is back, heartbeats are answered locally meanwhile, and a 404/409 after the outage
reaches the task. Real loopback HTTP (uvicorn); the upstream is an ``httpx.MockTransport`` that
can be switched off, since a real server cannot be made to refuse connections on cue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.testing.task_tokens import TaskTokens


class FlakyExecutionApi:
    """Refuses connections (or answers ``down_status``) while ``down``; records what got through."""

    def __init__(self, down_status: int | None = None) -> None:
        self.down = True
        self.down_status = down_status
        self.attempts = 0
        self.delivered: list[tuple[str, str, bytes]] = []
        self.heartbeat_status = 204

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.down:
            if self.down_status is None:
                raise httpx.ConnectError("connection refused")
            return httpx.Response(self.down_status, text="bad gateway")
        self.delivered.append((request.method, request.url.path, request.content))
        if request.url.path.endswith("/heartbeat"):
            return httpx.Response(self.heartbeat_status, json={"detail": {"reason": "not_running"}})
        return httpx.Response(200, json={"ok": True}, headers={"Refreshed-API-Token": "fresh"})


def _run(tmp_path: Path, upstream: FlakyExecutionApi, fn, **flags) -> None:
    settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state"),
                              **flags}, env={})

    async def main() -> None:
        egress = Egress(settings, upstream_transport=httpx.MockTransport(upstream))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60, auth=TaskTokens(egress)) as client:
                await fn(client, egress.gateway._outage)
        finally:
            await egress.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("down_status", [None, 503, 502, 504])
def test_request_is_held_through_the_outage_and_delivered_once(tmp_path: Path, down_status: int | None) -> None:
    upstream = FlakyExecutionApi(down_status)

    async def fn(client: httpx.AsyncClient, outage) -> None:
        pending = asyncio.create_task(client.patch("task-instances/t1/state", content=b'{"state":"success"}'))
        while upstream.attempts < 3:
            await asyncio.sleep(0.05)
        assert not pending.done() and outage.down_since is not None and outage.holding == 1
        upstream.down = False
        r = await pending
        assert r.status_code == 200 and r.headers["refreshed-api-token"] == "fresh"
        assert outage.down_since is None and outage.holding == 0

    _run(tmp_path, upstream, fn)
    assert upstream.delivered == [("PATCH", "/execution/task-instances/t1/state", b'{"state":"success"}')]


def test_heartbeats_are_answered_locally_while_down_and_a_409_after_it_reaches_the_task(tmp_path: Path) -> None:
    upstream = FlakyExecutionApi()

    async def fn(client: httpx.AsyncClient, outage) -> None:
        for _ in range(3):
            r = await client.put("task-instances/t1/heartbeat", json={"pid": 1})
            assert r.status_code == 204
        assert outage.local_heartbeats == 3 and upstream.delivered == []
        upstream.down = False
        upstream.heartbeat_status = 409  # the server no longer considers the task running
        r = await client.put("task-instances/t1/heartbeat", json={"pid": 1})
        assert r.status_code == 409 and r.json()["detail"]["reason"] == "not_running"

    _run(tmp_path, upstream, fn)
    assert [p for _, p, _ in upstream.delivered] == ["/execution/task-instances/t1/heartbeat"]


def test_a_heartbeat_that_gets_through_wakes_the_held_requests(tmp_path: Path) -> None:
    upstream = FlakyExecutionApi()

    async def fn(client: httpx.AsyncClient, outage) -> None:
        outage.cap_s = outage.base_s = 3600.0  # held requests would sleep "forever" unless woken
        first = asyncio.create_task(client.post("xcoms/d/r/t/a", content=b"1"))
        while outage.holding < 1:
            await asyncio.sleep(0.05)
        upstream.down = False
        assert (await client.put("task-instances/t1/heartbeat", json={})).status_code == 204
        r = await asyncio.wait_for(first, 30)
        assert r.status_code == 200

    _run(tmp_path, upstream, fn)
    assert [p for _, p, _ in upstream.delivered][-1] == "/execution/xcoms/d/r/t/a"


def test_the_worker_reaching_the_control_plane_wakes_the_held_requests_and_the_reverse(tmp_path: Path) -> None:
    upstream = FlakyExecutionApi()
    settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state")}, env={})
    told: list[str] = []

    async def main() -> None:
        egress = Egress(settings, upstream_transport=httpx.MockTransport(upstream),
                        on_upstream_back=lambda: told.append("back"))
        url = await egress.start()
        outage = egress.gateway._outage
        outage.cap_s = outage.base_s = 3600.0  # held requests would sleep "forever" unless woken
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60, auth=TaskTokens(egress)) as client:
                held = asyncio.create_task(client.post("xcoms/d/r/t/a", content=b"1"))
                while outage.holding < 1:
                    await asyncio.sleep(0.05)
                egress.control_plane_back()  # still down: the retry fails and the request stays held
                while upstream.attempts < 2:
                    await asyncio.sleep(0.05)
                assert not held.done() and outage.down_since is not None and told == []
                upstream.down = False
                egress.control_plane_back()  # the worker's heartbeat got through
                assert (await asyncio.wait_for(held, 30)).status_code == 200
                assert told == ["back"]  # and the worker is told once the held request got through
                egress.control_plane_back()  # nothing held, not down: no effect
        finally:
            await egress.aclose()

    asyncio.run(main())
    assert upstream.delivered == [("POST", "/execution/xcoms/d/r/t/a", b"1")]


def test_a_request_is_held_no_longer_than_outage_hold_s(tmp_path: Path) -> None:
    upstream = FlakyExecutionApi()

    async def fn(client: httpx.AsyncClient, outage) -> None:
        r = await client.patch("task-instances/t1/state", json={})
        assert r.status_code == 502 and "unreachable for" in r.json()["detail"]
        assert upstream.attempts >= 2 and outage.holding == 0

    _run(tmp_path, upstream, fn, outage_hold_s=1)
    assert upstream.delivered == []


def test_a_client_error_is_not_held(tmp_path: Path) -> None:
    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": "token expired"})

    async def main() -> None:
        settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "s")}, env={})
        egress = Egress(settings, upstream_transport=httpx.MockTransport(forbidden))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                r = await client.patch("task-instances/t1/state", json={})
            assert r.status_code == 403 and egress.gateway._outage.down_since is None
        finally:
            await egress.aclose()

    asyncio.run(main())
