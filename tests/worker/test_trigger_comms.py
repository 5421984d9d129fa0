"""The trigger runner's Task SDK comms without a control plane: the real runner child refuses what
is not a trigger class, fails only the trigger that sends a request it cannot answer, and keeps a
long wait's token fresh both ways (refreshed on the trigger's own request, and by a heartbeat)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.testing.variable_server import VariableServer
from airflow_outpost.worker.triggers import Deferral, LocalTriggers, WaitEnd
from tests.helpers import DAGS

RUN_BODY = {"state": "running", "hostname": "h1", "unixname": "u", "pid": 4242, "start_date": "2026-12-02T00:00:00Z"}


def _deferral(ti_id: str, classpath: str, kwargs: dict, tmp_path: Path) -> Deferral:
    from airflow.sdk.serde import serialize

    return Deferral(ti_id=ti_id, classpath=classpath, trigger_kwargs=serialize(kwargs), next_method="execute_complete",
                    next_kwargs=serialize({}), token="t0", run_body=RUN_BODY, log_file=str(tmp_path / f"{ti_id}.log"))


def _host(tmp_path: Path, api_url: str, heartbeat: httpx.MockTransport, **kw) -> LocalTriggers:
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    return LocalTriggers(max_waiting=10, gateway_url=lambda: api_url, env=lambda: env,
                         stderr_path=tmp_path / "runner.log", transport=heartbeat, **kw)


@pytest.mark.timeout(120)
def test_a_class_path_that_is_not_a_trigger_is_refused_unbuilt(tmp_path: Path) -> None:
    async def main() -> dict[str, WaitEnd]:
        host = _host(tmp_path, "http://gw.invalid/execution/", httpx.MockTransport(lambda r: httpx.Response(204)))
        try:
            waits = {name: host.wait(_deferral(name, path, kwargs, tmp_path)) for name, path, kwargs in [
                ("system", "os.system", {"command": f"touch {tmp_path / 'pwned-system'}"}),
                ("eval", "builtins.eval", {"source": f"open({str(tmp_path / 'pwned-eval')!r}, 'w')"}),
                ("unknown", "outpost_triggers.UnknownRequestTrigger", {}),
            ]}
            return {k: await asyncio.wait_for(f, 60) for k, f in waits.items()}
        finally:
            await host.aclose()

    ends = asyncio.run(main())
    for name, path in (("system", "os.system"), ("eval", "builtins.eval")):
        assert ends[name].kind == "fail", ends[name]
        assert f"{path!r} is not a trigger class" in (ends[name].error or ""), ends[name]
    assert not (tmp_path / "pwned-system").exists() and not (tmp_path / "pwned-eval").exists()
    # A request type nobody answers fails that trigger, with a message naming it; the runner lives on.
    assert ends["unknown"].kind == "fail" and "GetSomethingNew" in (ends["unknown"].error or ""), ends["unknown"]
    assert "local triggers answer" in (ends["unknown"].error or "") and "GetVariable" in (ends["unknown"].error or "")


@pytest.mark.timeout(120)
def test_a_long_wait_keeps_its_token_fresh_both_ways(tmp_path: Path) -> None:
    server = VariableServer()
    journaled: list[tuple[str, str]] = []
    beats: list[str] = []

    def heartbeat(request: httpx.Request) -> httpx.Response:
        beats.append(request.headers["Authorization"])
        return httpx.Response(204, headers={"Refreshed-API-Token": "t2"})

    async def main() -> WaitEnd:
        host = _host(tmp_path, server.url, httpx.MockTransport(heartbeat),
                     on_token=lambda ti_id, token: journaled.append((ti_id, token)))
        try:
            server.refresh_next("t1")  # the server refreshes on the trigger's first request
            ended = host.wait(_deferral("ti-1", "outpost_triggers.VariablePollTrigger",
                                        {"key": "k", "times": 3, "pause_s": 1.5}, tmp_path))
            deadline = time.monotonic() + 60
            while len(server.seen()) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await host.heartbeat_now()  # the heartbeat carries the token the trigger got, and gets t2
            return await asyncio.wait_for(ended, 60)
        finally:
            await host.aclose()
            server.close()

    end = asyncio.run(main())
    assert end.kind == "resume", end
    assert server.seen() == ["t0", "t1", "t2"], server.seen()
    assert beats == ["Bearer t1"], (beats, journaled)
    assert journaled == [("ti-1", "t1"), ("ti-1", "t2")], journaled
