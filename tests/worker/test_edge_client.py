"""Edge API client edge cases a real server can't be made to produce (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jwt
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.client import EdgeClient, retry
from airflow_outpost.worker.edge.jobs import JobKey
from airflow_outpost.worker.errors import AuthError, ConnectError, DuplicateWorkerError, TransientServerError, VersionMismatchError

SECRET = "s" * 64


def _client(handler) -> EdgeClient:
    settings = load_settings({"api_url": "http://cp:8080", "request_timeout_s": "2"}, env={"OUTPOST_JWT_SECRET": SECRET})
    return EdgeClient(settings, transport=httpx.MockTransport(handler))


def test_requests_are_signed_for_the_decoded_path() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        claims = jwt.decode(request.headers["Authorization"], SECRET, algorithms=["HS512"], audience="api")
        seen["method"] = claims["method"]
        seen["raw_path"] = request.url.raw_path.decode()
        seen["body"] = json.loads(request.content)
        return httpx.Response(204)

    key = JobKey("dag", "task", "manual__2024-01-01T00:00:00+00:00", 1, -1, "01a1fcb9-bdcd-7649-88f9-50577d090e30")
    client = _client(handler)
    asyncio.run(client.jobs.set_state(key, "success"))
    assert seen["method"] == "jobs/state/dag/task/manual__2024-01-01T00:00:00+00:00/1/-1/success"
    assert "%2B00%3A00" in seen["raw_path"]  # '+' and ':' are escaped on the wire
    assert seen["body"] == {"task_instance_id": key.task_instance_id}
    assert client.counter.total == 1


@pytest.mark.parametrize(
    ("status", "exc_type", "retryable"),
    [(500, TransientServerError, True), (503, TransientServerError, True), (429, TransientServerError, True),
     (403, AuthError, False), (409, DuplicateWorkerError, False), (400, VersionMismatchError, False)],
)
def test_status_mapping_keeps_server_message(status: int, exc_type: type, retryable: bool) -> None:
    client = _client(lambda r: httpx.Response(status, json={"detail": f"server says {status}"}))
    with pytest.raises(exc_type) as err:
        asyncio.run(client.worker.register("w1", "starting", None, {}, None))
    assert err.value.retryable is retryable
    assert f"server says {status}" in str(err.value)


def test_retry_retries_5xx_then_succeeds_but_not_4xx() -> None:
    calls = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(502, text="bad gateway") if calls["n"] < 3 else httpx.Response(200, json={"state": "idle"})

    client = _client(flaky)
    result = asyncio.run(retry(lambda: client.worker.set_state("w1", "idle", 0, None, {}), what="hb",
                               deadline_s=10, base_s=0.01, cap_s=0.02))
    assert result == {"state": "idle"} and calls["n"] == 3

    calls["n"] = 0

    def forbidden(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(403, json={"detail": "Forbidden"})

    client = _client(forbidden)
    with pytest.raises(AuthError):
        asyncio.run(retry(lambda: client.worker.set_state("w1", "idle", 0, None, {}), what="hb",
                          deadline_s=10, base_s=0.01, cap_s=0.02))
    assert calls["n"] == 1  # a 4xx is reported, not retried


def test_connection_errors_are_retryable_and_deadline_bounded() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = _client(refuse)
    with pytest.raises(ConnectError, match="cannot reach http://cp:8080"):
        asyncio.run(retry(lambda: client.jobs.fetch("w1", None, 1, None), what="fetch",
                          deadline_s=0.3, base_s=0.01, cap_s=0.05))
    assert client.counter.total >= 2


def test_non_json_success_body_is_an_error_not_a_crash() -> None:
    client = _client(lambda r: httpx.Response(200, text="<html>proxy login</html>"))
    with pytest.raises(Exception, match="not JSON"):
        asyncio.run(client.jobs.fetch("w1", None, 1, None))


def test_execution_api_check_says_it_cannot_tell_when_the_server_is_slow() -> None:
    """A cold API server can take longer than request_timeout_s to build an OpenAPI document; that is
    no reason to refuse to start (found by starting a worker with --request-timeout-s 5 against a
    control plane that had just come up)."""
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def unknown(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "OpenApi file of with version `2099-01-01` not found"})

    assert asyncio.run(_client(slow).serves_execution_api("2026-06-30")) is None
    assert asyncio.run(_client(unknown).serves_execution_api("2099-01-01")) is False
    assert asyncio.run(_client(lambda r: httpx.Response(200, json={})).serves_execution_api("2026-06-30")) is True
