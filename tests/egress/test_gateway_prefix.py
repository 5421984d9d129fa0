"""The gateway's secret path prefix and the recorded address a restarted worker serves again.

Task processes are given ``http://127.0.0.1:<port>/<32 hex>/execution/``; a request that lacks the
prefix (sent raw, as a process that found the port would) is refused 404 and ledgered, without the
secret ever reaching the ledger. The port and prefix are kept in ``gateway.json`` (0600) in the
state folder, reused by a restarted gateway on that folder, and trusted only when the file is the
worker's own; a recorded port another OS user listens on is refused with its uid named, and the
task processes that would send it their tokens are stopped (recovery's decision).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.egress.gateway_file import listener_uid
from airflow_outpost.worker.runtime.recovery import decide
from tests.egress.test_gateway import _settings, _token
from tests.egress.test_gateway_admission import OURS, _raw_request, _refused_rows

URL = re.compile(r"^http://127\.0\.0\.1:(\d+)(/[0-9a-f]{32}/execution/)$")
ENTRY = {"pid": 4242, "output": "/s/o", "queue": "default", "slots": 1, "log_path": "l", "dag_rel_path": "d.py",
         "ti_id": OURS}


def _egress(state: Path, seen: list[httpx.Request] | None = None) -> Egress:
    def upstream(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, json={"ok": True})

    return Egress(_settings(state), upstream_transport=httpx.MockTransport(upstream))


async def _started(state: Path) -> tuple[str, Egress]:
    egress = _egress(state)
    url = await egress.start()
    return url, egress


def _adopt_decision(egress: Egress, old_url: str):
    return decide({**ENTRY, "server": old_url}, final_state=None, exit_code=None, alive=True, policy="adopt",
                  gateway_url=egress.url, gateway_moved=egress.gateway_moved)


@pytest.mark.parametrize("path", [
    "/execution/variables/api_key",  # the bare Execution API path of earlier versions
    "/0123456789abcdef0123456789abcdef/execution/variables/api_key",  # a guessed prefix
    "/variables/api_key",
])
def test_a_request_without_the_secret_prefix_is_refused_and_ledgered(tmp_path: Path, path: str) -> None:
    seen: list[httpx.Request] = []

    async def main() -> str:
        egress = _egress(tmp_path, seen)
        url = await egress.start()
        egress.admit(OURS, "d.t run=r try=1")
        auth = {"Authorization": f"Bearer {_token(OURS)}"}
        try:
            assert URL.match(url), url
            status, body = await _raw_request(url, f"GET {path} HTTP/1.1", auth)
            assert status == 404 and "outpost gateway" in json.loads(body)["detail"], body
            assert seen == []  # nothing reached the control plane
            # The URL task processes are given works, with the same token.
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.get("variables/api_key", headers=auth)
            assert r.status_code == 200 and len(seen) == 1
            return egress.gateway.prefix
        finally:
            egress.ledger.flush()
            await egress.aclose()

    prefix = asyncio.run(main())
    assert _refused_rows(tmp_path) == [(path, "refused", 404)]
    secret = prefix.strip("/").split("/")[0]
    assert secret not in (tmp_path / "state" / "egress.sqlite").read_bytes().decode("latin-1")


def test_the_port_and_prefix_are_kept_in_the_state_folder_and_served_again(tmp_path: Path) -> None:
    async def main() -> None:
        first_url, first = await _started(tmp_path)
        async with httpx.AsyncClient() as client:  # leave a connection behind, as a crash would
            await client.get(f"{first_url}variables/x")
        await first.aclose()
        record = tmp_path / "state" / "gateway.json"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        m = URL.match(first_url)
        assert m and json.loads(record.read_text()) == {"port": int(m.group(1)), "prefix": m.group(2)}

        again_url, again = await _started(tmp_path)  # a restart on the same state folder
        try:
            assert again_url == first_url and again.port_kept is True and again.gateway_moved is None
            assert _adopt_decision(again, first_url).action == "adopt"
        finally:
            await again.aclose()

        other_url, other = await _started(tmp_path / "fresh")  # a fresh state folder: a fresh prefix
        try:
            assert other.port_kept is None
            assert URL.match(other_url).group(2) != m.group(2)  # type: ignore[union-attr]
        finally:
            await other.aclose()

    asyncio.run(main())


def _symlinked(record: Path) -> None:
    real = record.parent.parent / "elsewhere.json"
    real.write_bytes(record.read_bytes())
    real.chmod(0o600)
    record.unlink()
    record.symlink_to(real)


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda record: record.chmod(0o644), id="readable-by-others"),
    pytest.param(lambda record: record.chmod(0o660), id="group-bits"),
    pytest.param(lambda record: record.parent.chmod(0o777), id="folder-writable-by-others"),
    pytest.param(_symlinked, id="symlink"),
    pytest.param(lambda record: os.chown(record, 65534, 65534), id="owned-by-another-user",
                 marks=pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")),
])
def test_a_gateway_file_that_is_not_the_workers_own_is_not_trusted(tmp_path: Path, spoil, caplog) -> None:
    async def main() -> None:
        first_url, first = await _started(tmp_path)
        await first.aclose()
        spoil(tmp_path / "state" / "gateway.json")
        with caplog.at_level(logging.ERROR):
            url, again = await _started(tmp_path)
        try:
            assert again.port_kept is False and url != first_url
            assert URL.match(url).group(2) != URL.match(first_url).group(2)  # type: ignore[union-attr]
            assert "not trusted" in (again.gateway_moved or "")
            decision = _adopt_decision(again, first_url)
            assert (decision.action, decision.state) == ("stop", "failed") and "not trusted" in decision.reason
            assert URL.match(first_url).group(2) not in decision.reason  # type: ignore[union-attr]
        finally:
            await again.aclose()

    asyncio.run(main())
    assert "not trusting the egress gateway's recorded address" in caplog.text


def test_listener_uid_reads_the_owner_of_a_loopback_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert listener_uid(port) is None  # bound, not listening
        sock.listen()
        assert listener_uid(port) == os.getuid()
    with socket.socket(socket.AF_INET6) as sock6:
        sock6.bind(("::", 0))  # dual-stack wildcard: receives 127.0.0.1 too
        sock6.listen()
        assert listener_uid(sock6.getsockname()[1]) == os.getuid()


@pytest.mark.skipif(os.getuid() != 0, reason="creates a second OS user (useradd)")
def test_a_recorded_port_another_user_listens_on_is_refused_and_named(tmp_path: Path, caplog) -> None:
    """While no worker runs, another user binds the gateway's recorded port (adopted task processes
    would send it their tokens). The restarted worker's gateway says so, naming the port and uid,
    serves elsewhere under a new prefix, and recovery stops the task processes instead of adopting."""
    from airflow_outpost.worker.testing.os_users import os_user, user_python

    async def first_run() -> str:
        url, egress = await _started(tmp_path)
        await egress.aclose()
        return url

    first_url = asyncio.run(first_run())
    taken = int(URL.match(first_url).group(1))  # type: ignore[union-attr]
    listener = ("import json, socket, sys, time\n"
                "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
                "print(json.dumps('ready'), flush=True)\n"
                "time.sleep(60)\n")
    with os_user() as other:
        proc = subprocess.Popen([user_python(), "-c", listener, str(taken)], user=other.uid, group=other.gid,
                                stdout=subprocess.PIPE, text=True, cwd="/")
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == '"ready"'
            assert listener_uid(taken) == other.uid

            async def restart() -> None:
                url, egress = await _started(tmp_path)
                try:
                    assert egress.port_kept is False and egress.port != taken
                    assert urlsplit(url).path != urlsplit(first_url).path  # the old prefix is not reused
                    assert f"port {taken} is held by uid {other.uid}" in (egress.gateway_moved or "")
                    decision = _adopt_decision(egress, first_url)
                    assert (decision.action, decision.state) == ("stop", "failed")
                    assert f"uid {other.uid}, another user" in decision.reason
                finally:
                    await egress.aclose()

            with caplog.at_level(logging.ERROR):
                asyncio.run(restart())
        finally:
            proc.kill()
            proc.wait(10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"previous port {taken} is held by uid {other.uid}" in e for e in errors), errors
