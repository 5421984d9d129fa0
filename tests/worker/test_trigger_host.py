"""Local triggers without a control plane: the real trigger runner child with real Airflow triggers,
the host's limit, timeout, heartbeats and token refresh (against an ``httpx.MockTransport`` server),
the gateway's keeping of deferrals and replay of a resumed start, settings and crash decisions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.egress.gateway import Egress, Resume
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.observability.prometheus import WorkerMetrics, WorkerSnapshot
from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.testing.task_tokens import TaskTokens
from airflow_outpost.worker.triggers import Deferral, LocalTriggers, WaitEnd
from airflow_outpost.worker.triggers.host import trigger_timeout_s
from tests.helpers import DAGS

RUN_BODY = {"state": "running", "hostname": "h1", "unixname": "u", "pid": 4242, "start_date": "2026-12-02T00:00:00Z"}


def _serde(value):
    from airflow.sdk.serde import serialize

    return serialize(value)


def _deferral(ti_id: str, classpath: str, kwargs: dict, tmp_path: Path, **extra) -> Deferral:
    return Deferral(ti_id=ti_id, classpath=classpath, trigger_kwargs=_serde(kwargs), next_method="execute_complete",
                    next_kwargs=_serde({"mine": 1}), token="t0", run_body=RUN_BODY,
                    log_file=str(tmp_path / f"{ti_id}.log"), **extra)


class Server:
    """The Execution API's heartbeat endpoint as a test wants it to answer."""

    def __init__(self) -> None:
        self.beats: list[httpx.Request] = []
        self.status = 204
        self.refresh: str | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.beats.append(request)
        headers = {"Refreshed-API-Token": self.refresh} if self.refresh else {}
        if self.status == 409:
            return httpx.Response(409, json={"detail": {"reason": "not_running", "message": "TI is no longer running"}})
        return httpx.Response(self.status, headers=headers)


def _host(tmp_path: Path, server: Server, **kw) -> LocalTriggers:
    import os

    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    return LocalTriggers(max_waiting=kw.pop("max_waiting", 10), gateway_url=lambda: "http://gw.invalid/execution/",
                         env=lambda: env, stderr_path=tmp_path / "runner.log", transport=httpx.MockTransport(server),
                         **kw)


@pytest.mark.timeout(120)
def test_real_triggers_fire_fail_and_end_tasks_in_the_runner_child(tmp_path: Path) -> None:
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

    async def main() -> dict[str, WaitEnd]:
        host = _host(tmp_path, Server())
        try:
            classpath, kwargs = TimeDeltaTrigger(dt.timedelta(seconds=1)).serialize()
            _, end_kwargs = TimeDeltaTrigger(dt.timedelta(seconds=0), end_from_trigger=True).serialize()
            waits = {
                "fires": host.wait(_deferral("fires", classpath, kwargs, tmp_path)),
                "ends": host.wait(_deferral("ends", classpath, end_kwargs, tmp_path)),
                "raises": host.wait(_deferral("raises", "outpost_triggers.BrokenTrigger", {}, tmp_path)),
                "missing": host.wait(_deferral("missing", "outpost_no_such_module.Gone", {}, tmp_path)),
            }
            assert host.waiting == 4
            return {k: await asyncio.wait_for(f, 60) for k, f in waits.items()}
        finally:
            await host.aclose()

    ends = asyncio.run(main())
    from airflow.sdk.serde import deserialize

    assert ends["fires"].kind == "resume"
    resumed = deserialize(ends["fires"].next_kwargs)
    assert resumed["mine"] == 1 and isinstance(resumed["event"], dt.datetime)  # the task's kwargs plus the event
    assert ends["ends"].kind == "task_end" and ends["ends"].state == "success"
    assert ends["raises"].kind == "fail" and "deliberate trigger failure" in "".join(ends["raises"].traceback or [])
    assert ends["missing"].kind == "fail" and "is not importable on this worker" in (ends["missing"].error or "")
    # What the triggers logged went to their tasks' log files, as JSON lines.
    lines = [json.loads(line) for line in (tmp_path / "fires.log").read_text().splitlines()]
    assert any("yielding event" in str(line.get("event")) for line in lines), lines


@pytest.mark.timeout(120)
def test_limit_timeout_heartbeats_and_a_try_that_went_away(tmp_path: Path) -> None:
    server = Server()

    async def main() -> None:
        refreshed: list[tuple[str, str]] = []
        host = _host(tmp_path, server, max_waiting=2, heartbeat_s=0.3, on_token=lambda ti, tok: refreshed.append((ti, tok)))
        try:
            timed = host.wait(_deferral("timed", "outpost_triggers.NeverTrigger", {}, tmp_path,
                                        deadline=time.time() + 1.0))
            gone = host.wait(_deferral("gone", "outpost_triggers.NeverTrigger", {}, tmp_path))
            over = host.wait(_deferral("over", "outpost_triggers.NeverTrigger", {}, tmp_path))
            end = await asyncio.wait_for(over, 5)  # beyond max_waiting: refused at once, naming the limit
            assert end.kind == "fail" and "max_local_triggers = 2" in (end.error or "")
            server.refresh = "t1"
            await asyncio.sleep(1.0)
            beat = server.beats[-1]
            # Heartbeats name the try's first task process (the server checks hostname and pid).
            assert json.loads(beat.content) == {"hostname": "h1", "pid": 4242}
            assert ("gone", "t1") in refreshed and beat.url.path.endswith("/heartbeat")
            end = await asyncio.wait_for(timed, 10)
            assert end.kind == "fail" and end.error == "Trigger timeout"  # the Task SDK raises TaskDeferralTimeout
            server.status = 409  # marked failed or cleared on the server
            end = await asyncio.wait_for(gone, 10)
            assert end.kind == "gone" and "no longer running" in (end.error or "")
            assert host.describe()["ended"] == {"fail": 2, "gone": 1} and host.waiting == 0
            assert server.beats[-1].headers["authorization"] == "Bearer t1"  # the refreshed token is used from then on
        finally:
            await host.aclose()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_dead_runner_child_is_restarted_with_the_waiting_triggers(tmp_path: Path) -> None:
    from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

    async def main() -> None:
        host = _host(tmp_path, Server())
        try:
            classpath, kwargs = TimeDeltaTrigger(dt.timedelta(seconds=4)).serialize()
            ended = host.wait(_deferral("a", classpath, kwargs, tmp_path))
            for _ in range(100):
                if host._child is not None:  # noqa: SLF001  (the test kills the child it observes)
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            host._child.kill()  # noqa: SLF001
            end = await asyncio.wait_for(ended, 60)
            assert end.kind == "resume" and host.restarts == 1
        finally:
            await host.aclose()

    asyncio.run(main())


def test_trigger_timeout_is_read_as_the_task_sdk_sends_it() -> None:
    assert trigger_timeout_s("PT30S") == 30.0 and trigger_timeout_s(2.5) == 2.5 and trigger_timeout_s(None) is None
    with pytest.raises(ValueError, match="not a duration"):
        trigger_timeout_s("soon")


def test_settings_for_local_triggers(tmp_path: Path) -> None:
    base = {"api_url": "http://cp:8080", "state_folder": str(tmp_path)}
    s = load_settings({**base, "triggers": "local", "max_local_triggers": "50"}, env={})
    assert s.triggers == "local" and s.max_local_triggers == 50
    assert load_settings(base, env={}).triggers == "central"
    with pytest.raises(ConfigError, match="triggers.*central.*local"):
        load_settings({**base, "triggers": "edge"}, env={})
    with pytest.raises(ConfigError, match="max_local_triggers"):
        load_settings({**base, "max_local_triggers": "0"}, env={})


def test_a_waiting_entry_after_a_crash_is_adopted_or_failed() -> None:
    entry = {"waiting": True, "deferral": {"ti_id": "x"}, "workload": {"ti": {"id": "x"}}}
    kw = {"final_state": None, "exit_code": 0, "alive": False, "gateway_url": "http://gw"}
    assert recovery.decide(entry, policy="adopt", local_triggers=True, **kw).action == "adopt"
    stop = recovery.decide(entry, policy="stop", local_triggers=True, **kw)
    assert (stop.action, stop.state) == ("report", "failed") and "crash_policy is stop" in stop.reason
    off = recovery.decide(entry, policy="adopt", local_triggers=False, **kw)
    assert off.state == "failed" and "triggers = local" in off.reason
    # A final state queued before the crash still wins.
    assert recovery.decide(entry, policy="adopt", local_triggers=True, **{**kw, "final_state": "success"}).state == "success"


def test_the_gateway_keeps_a_deferral_and_replays_a_resumed_start(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/run"):
            return httpx.Response(200, json={"dag_run": {}, "xcom_keys_to_clear": ["before"], "next_method": None})
        return httpx.Response(204)

    kept: list[tuple[str, dict]] = []
    settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state"),
                              "triggers": "local"}, env={})
    egress = Egress(settings, upstream_transport=httpx.MockTransport(upstream),
                    on_deferral=lambda ti, body, auth: kept.append((ti, json.loads(body))) or True)
    ti = "0190f0f0-0000-7000-8000-000000000009"
    defer = {"state": "deferred", "classpath": "secret.place.Trigger", "trigger_kwargs": {"bucket": "in-region"},
             "next_method": "execute_complete"}

    async def main() -> None:
        url = await egress.start()
        try:
            async with httpx.AsyncClient(base_url=url, auth=TaskTokens(egress)) as client:
                r = await client.patch(f"task-instances/{ti}/run", json=RUN_BODY)
                assert r.status_code == 200 and egress.start_of(ti) == RUN_BODY
                r = await client.patch(f"task-instances/{ti}/state", json=defer)
                assert r.status_code == 204
                assert kept == [(ti, defer)] and all("/state" not in str(s.url) for s in seen)  # nothing left
                egress.expect_resume(ti, Resume(RUN_BODY, "execute_complete", {"event": 1}))
                r = await client.patch(f"task-instances/{ti}/run", json={**RUN_BODY, "pid": 777})
                assert r.json() == {"dag_run": {}, "xcom_keys_to_clear": [], "next_method": "execute_complete",
                                    "next_kwargs": {"event": 1}}
                assert json.loads(seen[-1].content) == RUN_BODY  # the first start, replayed
                await client.put(f"task-instances/{ti}/heartbeat", json={"hostname": "h1", "pid": 777})
                assert json.loads(seen[-1].content) == {"hostname": "h1", "pid": 4242}
        finally:
            await egress.aclose()

    asyncio.run(main())


def test_metrics_show_the_waiting_tasks_and_the_limit() -> None:
    snapshot = WorkerSnapshot(state="running", reachable=True, concurrency=4, free_slots=4, running_queues=(), live=(),
                              outbox_depth=0, requests_total=0, request_rates={}, gpus_total=0, gpus_free=0,
                              gpu_devices=(), ray=None,
                              local_triggers={"waiting": 50, "max": 1000, "ended": {"resume": 3}, "oldest_s": 1.0})
    text = WorkerMetrics(lambda: snapshot).render().decode()
    assert "outpost_local_triggers_waiting 50.0" in text and "outpost_local_triggers_max 1000.0" in text
    assert 'outpost_local_triggers_ended_total{end="resume"} 3.0' in text


@pytest.mark.timeout(120)
def test_a_trigger_that_keeps_killing_its_runner_fails_the_waiting_tasks(tmp_path: Path, monkeypatch) -> None:
    from airflow_outpost.worker.triggers import host as host_module

    monkeypatch.setattr(host_module, "RESTART_BACKOFF_S", 0.1)

    async def main() -> WaitEnd:
        host = _host(tmp_path, Server())
        try:
            return await asyncio.wait_for(host.wait(_deferral("k", "outpost_triggers.KillerTrigger", {}, tmp_path)), 90)
        finally:
            await host.aclose()

    end = asyncio.run(main())
    assert end.kind == "fail" and "the trigger runner died 6 times" in (end.error or ""), end


def test_fail_kwargs_are_encoded_as_the_task_sdk_reads_them() -> None:
    end = WaitEnd("fail", error="Trigger timeout")
    assert end.fail_kwargs() == {"error": "Trigger timeout", "traceback": ["Trigger timeout"]}
    # Task SDK 1.1 (Airflow 3.1) wrote its next_kwargs with BaseSerialization and reads them back so.
    base = end.fail_kwargs(like={"__type": "dict", "__var": {}})
    from airflow.serialization.serialized_objects import BaseSerialization

    assert BaseSerialization.deserialize(base) == {"error": "Trigger timeout", "traceback": ["Trigger timeout"]}


def test_resumes_take_slots_in_order_and_give_up_when_told() -> None:
    from airflow_outpost.worker.triggers.host import ResumeQueue

    async def main() -> list[object]:
        queue, busy, order = ResumeQueue(), [1], []
        stopping = [False]

        async def one(key: str) -> None:
            ok = await queue.take(key, 1, lambda: 1, lambda: busy[0], give_up=lambda: stopping[0], poll_s=0.01)
            order.append((key, ok))
            if ok:
                busy[0] += 1

        tasks = [asyncio.create_task(one(k)) for k in ("a", "b")]
        await asyncio.sleep(0.05)
        assert order == []  # the only slot is busy
        busy[0] = 0
        await asyncio.sleep(0.05)
        stopping[0] = True  # "b" still waits (a holds the slot): the drain timeout ends it
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == [("a", True), ("b", False)]
