"""The egress gateway over real loopback HTTP (uvicorn), with a fake Execution API upstream
(``httpx.MockTransport``): pass-through of methods, headers, bodies and status codes; refusals
with the rule in the body the Task SDK reads; every request in the ledger."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.egress import ledger
from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.egress.policy import Policy, classify
from airflow_outpost.worker.testing.task_tokens import TaskTokens


def _token(sub: str) -> str:
    part = base64.urlsafe_b64encode(json.dumps({"sub": sub}).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{part}.sig"


def _settings(tmp_path: Path, **flags):
    return load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state"), **flags}, env={})


class FakeExecutionApi:
    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        path = request.url.path
        if path.endswith("/heartbeat"):
            return httpx.Response(409, json={"detail": {"reason": "not_running"}})
        if "/xcoms/" in path and request.method == "GET":
            return httpx.Response(404, json={"detail": "XCom not found"})
        return httpx.Response(201, json={"echo": request.content.decode(), "auth": request.headers.get("authorization")},
                              headers={"Refreshed-API-Token": "new-token"})


async def _with_gateway(tmp_path: Path, fn, **flags):
    upstream = FakeExecutionApi()
    egress = Egress(_settings(tmp_path, **flags), upstream_transport=httpx.MockTransport(upstream))
    url = await egress.start()
    try:
        async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
            return await fn(client, upstream, egress)
    finally:
        await egress.aclose()


def test_passes_requests_and_answers_through_unchanged(tmp_path: Path) -> None:
    async def fn(client: httpx.AsyncClient, upstream: FakeExecutionApi, egress: Egress):
        token = _token("0190f0f0-0000-7000-8000-000000000001")
        r = await client.post("xcoms/d/r%2B1/t/k", params={"map_index": "3"}, content=b'{"a":1}',
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert r.status_code == 201 and r.json() == {"echo": '{"a":1}', "auth": f"Bearer {token}"}
        assert r.headers["refreshed-api-token"] == "new-token"
        sent = upstream.seen[-1]
        assert str(sent.url) == "http://cp.invalid:8080/execution/xcoms/d/r%2B1/t/k?map_index=3"
        assert sent.method == "POST" and sent.content == b'{"a":1}'
        # 404 and 409 from the server reach the Task SDK as they are.
        r = await client.get("xcoms/d/r/t/missing", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404 and r.json() == {"detail": "XCom not found"}
        r = await client.put("task-instances/0190f0f0-0000-7000-8000-000000000001/heartbeat", json={"pid": 1})
        assert r.status_code == 409 and r.json() == {"detail": {"reason": "not_running"}}
        egress.ledger.flush()

    asyncio.run(_with_gateway(tmp_path, fn))
    rows = ledger.report(tmp_path / "state" / "egress.sqlite")
    by_kind = {k["kind"]: k for k in rows["kinds"]}
    assert by_kind["xcom"]["requests"] == 2 and by_kind["xcom"]["bytes_sent"] == 7
    assert by_kind["heartbeat"]["requests"] == 1
    assert {r["task"] for r in rows["largest"] if r["kind"] == "xcom"} == {"0190f0f0-0000-7000-8000-000000000001"}
    assert ledger.verify(tmp_path / "state" / "egress.sqlite").ok


def test_refuses_what_the_policy_forbids_and_records_it(tmp_path: Path) -> None:
    async def fn(client: httpx.AsyncClient, upstream: FakeExecutionApi, egress: Egress):
        r = await client.post("xcoms/d/r/t/return_value", content=b"x" * 70_000)
        assert r.status_code == 413 and r.headers["content-type"] == "application/json"
        detail = r.json()["detail"]
        assert "max_xcom_bytes" in detail and "70,000 bytes" in detail and "65,536" in detail and "eu-1" in detail
        r = await client.get("connections/warehouse")
        assert r.status_code == 403 and "secrets=local-only" in r.json()["detail"] and "'warehouse'" in r.json()["detail"]
        r = await client.get("variables/api_key")
        assert r.status_code == 403
        assert upstream.seen == []  # nothing refused ever left
        egress.ledger.flush()

    asyncio.run(_with_gateway(tmp_path, fn, region="eu-1", max_xcom_bytes=65536, secrets="local-only"))
    data = ledger.report(tmp_path / "state" / "egress.sqlite")
    assert [(r["kind"], r["rule"]) for r in reversed(data["refused"])] == [
        ("xcom", "max_xcom_bytes"), ("connection", "secrets=local-only"), ("variable", "secrets=local-only")]
    assert data["bytes_sent"] == 0


def test_unreachable_control_plane_is_a_retryable_502(tmp_path: Path) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def main() -> None:
        # outage_hold_s=0: no holding (tests/worker/test_outage_hold.py covers the hold).
        egress = Egress(_settings(tmp_path, outage_hold_s=0), upstream_transport=httpx.MockTransport(down))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                r = await client.patch("task-instances/x/state", json={})
            assert r.status_code == 502 and "unreachable" in r.json()["detail"]
        finally:
            await egress.aclose()

    asyncio.run(main())
    [row] = ledger.report(tmp_path / "state" / "egress.sqlite")["largest"]
    assert row["outcome"] == "error" and row["status"] is None


@pytest.mark.parametrize(("path", "method", "kind"), [
    ("task-instances/abc/heartbeat", "PUT", "heartbeat"),
    ("task-instances/abc/state", "PATCH", "state"),
    ("task-instances/abc/run", "PATCH", "state"),
    ("task-instances/abc/rtif", "PUT", "rendered-fields"),
    ("xcoms/d/r/t/k", "POST", "xcom"),
    ("connections/c", "GET", "connection"),
    ("variables/v", "GET", "variable"),
    ("asset-events/by-asset", "GET", "asset"),
    ("logs/push/d/t/r/1/-1", "POST", "logs"),
    ("jobs/fetch/w1", "POST", "job-fetch"),
    ("jobs/state/d/t/r/1/-1/success", "PATCH", "state"),
    ("worker/w1", "PATCH", "worker"),
])
def test_classify(path: str, method: str, kind: str) -> None:
    assert classify(path, method) == kind


def test_policy_lets_state_and_small_xcom_through() -> None:
    policy = Policy(max_xcom_bytes=100, secrets="local-only", logs="none")
    assert policy.check("state", "PATCH", "task-instances/x/state", 10**6) is None
    # A state update carries the task's asset events and their extras: capped too (test_gateway_caps.py).
    assert policy.check("state", "PATCH", "task-instances/x/state", 10**9) is not None
    assert policy.check("heartbeat", "PUT", "task-instances/x/heartbeat", 10**6) is None
    assert policy.check("xcom", "POST", "xcoms/d/r/t/k", 100) is None
    assert policy.check("xcom", "GET", "xcoms/d/r/t/k", 0) is None
    # 0 = no cap of its own; the gateway's ceiling (512 MiB) still bounds what it reads.
    assert Policy(max_xcom_bytes=0).check("xcom", "POST", "xcoms/d/r/t/k", 10**8) is None
    assert Policy(secrets="local-first").check("connection", "GET", "connections/c", 0) is None


def test_worker_edge_calls_are_recorded_and_attributed_to_their_task(tmp_path: Path) -> None:
    egress = Egress(_settings(tmp_path))
    egress.ledger.start()
    egress.record_edge("PATCH", "/edge_worker/v1/jobs/state/d/t/manual__1%2B0/1/3/success", b'{"x":1}', 204, 0)
    egress.record_edge("POST", "/edge_worker/v1/jobs/fetch/w1", b"{}", None, 0)
    egress.ledger.close()
    rows = ledger.report(tmp_path / "state" / "egress.sqlite")["largest"]
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["state"]["task"] == "d.t[3] run=manual__1+0 try=1" and by_kind["state"]["bytes"] == 7
    assert by_kind["job-fetch"]["outcome"] == "error" and by_kind["job-fetch"]["task"] is None


def test_rendered_fields_stay_in_the_region_by_default(tmp_path: Path) -> None:
    rtif = b'{"sql": "SELECT * FROM patients WHERE ssn = \'123-45-6789\'"}'

    async def kept(client: httpx.AsyncClient, upstream: FakeExecutionApi, egress: Egress):
        r = await client.put("task-instances/0190f0f0-0000-7000-8000-000000000001/rtif", content=rtif)
        assert r.status_code == 201  # the Task SDK sees success: the task is not failed for it
        assert "stay in the region" in r.json()["message"]
        assert upstream.seen == []
        egress.ledger.flush()

    asyncio.run(_with_gateway(tmp_path / "a", kept))
    data = ledger.report(tmp_path / "a" / "state" / "egress.sqlite")
    assert data["bytes_sent"] == 0

    async def sent(client: httpx.AsyncClient, upstream: FakeExecutionApi, egress: Egress):
        r = await client.put("task-instances/0190f0f0-0000-7000-8000-000000000001/rtif", content=rtif)
        assert r.status_code == 201 and [req.content for req in upstream.seen] == [rtif]

    asyncio.run(_with_gateway(tmp_path / "b", sent, rendered_fields="full"))


def test_gzipped_running_elsewhere_answer_is_understood() -> None:
    import gzip

    from airflow_outpost.worker.egress.upstream import running_elsewhere

    answer = gzip.compress(json.dumps({"detail": {"reason": "running_elsewhere"}}).encode())
    assert running_elsewhere("PUT", "task-instances/abc/heartbeat", answer[:2048]) == "abc"
    assert running_elsewhere("PUT", "task-instances/abc/heartbeat", b"\x1f\x8bnot gzip") is None


def test_a_start_refused_by_the_server_is_remembered(tmp_path: Path) -> None:
    """The server answers 409 to ``.../run`` when the try already runs elsewhere (a job handed to two
    workers); the job runner then leaves that try's state to the other worker."""

    async def fn(client: httpx.AsyncClient, upstream: FakeExecutionApi, egress: Egress):
        r = await client.patch("task-instances/0190f0f0-0000-7000-8000-0000000000aa/run", content=b"{}")
        assert r.status_code == 201 and egress.start_refused == set()  # the fake upstream accepts it

    asyncio.run(_with_gateway(tmp_path / "a", fn))

    def refuse_run(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/heartbeat"):
            reason = "running_elsewhere" if "00dd" in request.url.path else "not_running"
            return httpx.Response(409, json={"detail": {"reason": reason}})
        return httpx.Response(409, json={"detail": {"reason": "invalid_state", "previous_state": "running"}})

    async def refused() -> None:
        egress = Egress(_settings(tmp_path / "b"), upstream_transport=httpx.MockTransport(refuse_run))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                r = await client.patch("task-instances/0190f0f0-0000-7000-8000-0000000000bb/run", content=b"{}")
                assert r.status_code == 409 and r.json()["detail"]["reason"] == "invalid_state"  # passed through
                # A heartbeat refused because the try runs elsewhere counts; one for a task that
                # simply should stop (marked failed by a user, say) does not.
                await client.put("task-instances/0190f0f0-0000-7000-8000-0000000000cc/heartbeat", content=b"{}")
                await client.put("task-instances/0190f0f0-0000-7000-8000-0000000000dd/heartbeat", content=b"{}")
            assert egress.start_refused == {"0190f0f0-0000-7000-8000-0000000000bb", "0190f0f0-0000-7000-8000-0000000000dd"}
        finally:
            await egress.aclose()

    asyncio.run(refused())


@pytest.mark.parametrize(("owner", "expected"), [(True, 200), (False, 409)])
def test_confirm_start_runs_a_try_only_where_the_server_recorded_it(tmp_path: Path, owner: bool, expected: int) -> None:
    """With confirm_start_s, an accepted start is checked by a heartbeat carrying the start's own
    identity; a 409 means another worker started the same try last, and this task must not run."""
    seen: list[tuple[str, str]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path.rsplit("/", 1)[-1]))
        if request.url.path.endswith("/heartbeat"):
            assert json.loads(request.content) == {"hostname": "h1", "pid": 4242}
            return httpx.Response(204) if owner else httpx.Response(409, json={"detail": {"reason": "running_elsewhere"}})
        return httpx.Response(200, json={"dag_run": {"dag_id": "d"}, "max_tries": 0})

    async def fn() -> None:
        egress = Egress(_settings(tmp_path, confirm_start_s="0.05"), upstream_transport=httpx.MockTransport(upstream))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                r = await client.patch("task-instances/0190f0f0-0000-7000-8000-0000000000ee/run",
                                       json={"hostname": "h1", "pid": 4242, "unixname": "u"})
                assert r.status_code == expected
                if owner:
                    assert r.json()["max_tries"] == 0
                else:
                    assert r.json()["detail"]["reason"] == "invalid_state"
            assert egress.start_refused == (set() if owner else {"0190f0f0-0000-7000-8000-0000000000ee"})
        finally:
            await egress.aclose()

    asyncio.run(fn())
    assert seen == [("PATCH", "run"), ("PUT", "heartbeat")]


def test_accepted_task_states_are_noted_refused_ones_are_not(tmp_path: Path) -> None:
    """The job runner reports a task's final state from what its task process told the server
    (the supervisor exits 0 after a failed try), so the gateway notes each state the server took."""
    seen: list[tuple[str, str]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409 if "00ff" in request.url.path else 204)

    async def run() -> None:
        egress = Egress(_settings(tmp_path), upstream_transport=httpx.MockTransport(upstream),
                        on_task_state=lambda ti, state: seen.append((ti, state)))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                ok = "0190f0f0-0000-7000-8000-0000000000ee"
                await client.patch(f"task-instances/{ok}/state", json={"state": "up_for_retry", "end_date": "x"})
                await client.patch("task-instances/0190f0f0-0000-7000-8000-0000000000ff/state", json={"state": "success"})
                await client.patch(f"task-instances/{ok}/state", content=b"[not json")
                await client.patch(f"task-instances/{ok}/state", json=["state"])
                await client.patch(f"task-instances/{ok}/run", json={"state": "running"})
        finally:
            await egress.aclose()

    asyncio.run(run())
    assert seen == [("0190f0f0-0000-7000-8000-0000000000ee", "up_for_retry")]


def test_a_failing_state_callback_is_logged_and_the_request_still_ledgered(tmp_path: Path, caplog) -> None:
    def broken(ti: str, state: str) -> None:
        raise TypeError("journal entry is not an object")

    async def run() -> int:
        egress = Egress(_settings(tmp_path), upstream_transport=httpx.MockTransport(lambda r: httpx.Response(204)),
                        on_task_state=broken)
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                resp = await client.patch("task-instances/0190f0f0-0000-7000-8000-0000000000ee/state", json={"state": "success"})
                return resp.status_code
        finally:
            await egress.aclose()

    assert asyncio.run(run()) == 204
    assert "could not note the state success of task instance 0190f0f0-0000-7000-8000-0000000000ee" in caplog.text
    assert "journal entry is not an object" in caplog.text
    db = sqlite3.connect(tmp_path / "state" / "egress.sqlite")
    assert db.execute("SELECT count(*) FROM egress WHERE endpoint LIKE '%/state' AND outcome='sent'").fetchone() == (1,)
