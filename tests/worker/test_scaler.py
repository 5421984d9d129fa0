"""``outpost scaler`` without a control plane: settings, the cache and rate limit, the password
credential, and the HTTP edge cases a real server cannot be made to produce (httpx.MockTransport).
The real control plane is in tests/deploy/test_scaler_e2e.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import jwt
import pytest

from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.scaler import QueueDepthReader, Scaler, TokenSource, Unavailable, load_scaler_settings
from airflow_outpost.worker.testing.gjson import keda_metric_value, split_path
from airflow_outpost.worker.testing.worker_process import run_outpost


def _ti(queue: str, state: str, slots: int = 1) -> dict:
    return {"queue": queue, "state": state, "pool_slots": slots}


def _pages(tis: list[dict]):
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        offset = int(request.url.params["offset"])
        limit = int(request.url.params["limit"])
        return httpx.Response(200, json={"task_instances": tis[offset:offset + limit], "total_entries": len(tis)})

    return handler, calls


def test_depth_sums_pool_slots_per_queue_across_pages(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    tis = [_ti("gpu", "queued")] * 150 + [_ti("gpu", "running", 2)] * 3 + [_ti("cpu", "queued", 3)]
    handler, calls = _pages(tis)

    async def go():
        reader = QueueDepthReader("http://cp", TokenSource(token_file=token), transport=httpx.MockTransport(handler))
        try:
            return await reader.read(("gpu", "cpu"))
        finally:
            await reader.aclose()

    depths = asyncio.run(go())
    assert depths["gpu"].queued == 150 and depths["gpu"].running_slots == 6 and depths["gpu"].workers(4) == 39
    assert depths["cpu"].queued_slots == 3
    assert len(calls) == 2 and calls[0].headers["authorization"] == "Bearer abc"
    assert calls[0].url.params.get_list("state") == ["queued", "running"]
    assert calls[0].url.path == "/api/v2/dags/~/dagRuns/~/taskInstances"


def test_many_callers_share_one_round_per_refresh_interval(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    handler, calls = _pages([_ti("gpu", "queued")] * 30)

    async def go():
        reader = QueueDepthReader("http://cp", TokenSource(token_file=token), transport=httpx.MockTransport(handler))
        scaler = Scaler(reader, queues=("gpu", "idle"), refresh_interval_s=3600)
        snaps = await asyncio.gather(*(scaler.current() for _ in range(50)))
        await reader.aclose()
        return snaps

    snaps = asyncio.run(go())
    assert len(calls) == 1
    doc = snaps[0].document(4, time.time())
    assert keda_metric_value(doc, "queues.gpu.workers") == 8 and keda_metric_value(doc, "queues.idle.workers") == 0


def test_password_credential_is_exchanged_and_renewed_after_a_401(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    issued: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            assert json.loads(request.content) == {"username": "reader", "password": "s3cret"}
            issued.append(jwt.encode({"exp": time.time() + 3600, "n": len(issued)}, "k" * 32, algorithm="HS256"))
            return httpx.Response(201, json={"access_token": issued[-1]})
        if request.headers["authorization"] == f"Bearer {issued[0]}":
            return httpx.Response(401, json={"detail": "revoked"})
        return httpx.Response(200, json={"task_instances": [], "total_entries": 0})

    async def go():
        reader = QueueDepthReader("http://cp", TokenSource(username="reader", password_file=password),
                                  transport=httpx.MockTransport(handler))
        try:
            return await reader.read()
        finally:
            await reader.aclose()

    assert asyncio.run(go()) == {}
    assert len(issued) == 2


def test_unreachable_control_plane_is_unavailable_with_why_after_stale_values_expire(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    up = {"ok": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if not up["ok"]:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"task_instances": [_ti("gpu", "queued")], "total_entries": 1})

    now = {"t": 1000.0}

    async def go():
        reader = QueueDepthReader("http://cp", TokenSource(token_file=token), transport=httpx.MockTransport(handler))
        scaler = Scaler(reader, refresh_interval_s=1, stale_after_s=30, clock=lambda: now["t"], wall=lambda: now["t"])
        assert (await scaler.current()).depths["gpu"].queued == 1
        up["ok"] = False
        now["t"] += 5
        assert (await scaler.current()).depths["gpu"].queued == 1  # one failed round: last values stand
        ok, why = await scaler.health()
        assert ok and "last round failed" in why
        now["t"] += 40
        with pytest.raises(Unavailable, match="control plane unreachable since .*ConnectError"):
            await scaler.current()
        assert b"outpost_scaler_up 0.0" in scaler.metrics()
        await reader.aclose()

    asyncio.run(go())


def test_gjson_escapes_dots_like_keda() -> None:
    assert split_path(r"queues.etl\.small.workers") == ["queues", "etl.small", "workers"]
    assert keda_metric_value({"queues": {"etl.small": {"workers": 3}}}, r"queues.etl\.small.workers") == 3
    with pytest.raises(KeyError):
        keda_metric_value({"queues": {}}, "queues.gpu.workers")


@pytest.mark.parametrize(("env", "setting"), [
    ({}, "api_url"),
    ({"OUTPOST_SCALER_API_URL": "http://cp"}, "token_file"),
    ({"OUTPOST_SCALER_API_URL": "ftp://cp", "OUTPOST_SCALER_TOKEN_FILE": "/etc/hostname"}, "api_url"),
    ({"OUTPOST_SCALER_API_URL": "http://cp", "OUTPOST_SCALER_TOKEN_FILE": "/etc/hostname",
      "OUTPOST_SCALER_CONCURRENCY": "0"}, "concurrency"),
    ({"OUTPOST_SCALER_API_URL": "http://cp", "OUTPOST_SCALER_TOKEN_FILE": "/etc/hostname",
      "OUTPOST_SCALER_REFRESH_INTERVAL_S": "soon"}, "refresh_interval_s"),
    ({"OUTPOST_SCALER_API_URL": "http://cp", "OUTPOST_SCALER_USERNAME": "u"}, "password_file"),
])
def test_bad_settings_name_the_setting(env: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scaler_settings(env=env)
    assert info.value.setting == setting


def test_cli_bad_setting_exits_2_with_one_line() -> None:
    proc = run_outpost("scaler", "--api-url", "http://cp", "--token-file", "/etc/hostname", "--port", "70000")
    assert proc.returncode == 2 and "invalid setting port=70000" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
