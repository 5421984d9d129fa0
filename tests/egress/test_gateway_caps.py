"""Every body a task writes has a cap, and the gateway reads no more than the cap of any request.

Sent as a hostile task would: a ``Content-Length`` claiming 2 GB with no body behind it (the
refusal must come before any body is read), a chunked body streamed past the cap (read up to
the cap, never buffered whole: the process's RSS stays flat), and each write kind just over its
own cap. The upstream is a fake control plane (``httpx.MockTransport``) that must see nothing.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.egress.policy import MAX_BODY_BYTES, Policy
from tests.egress.test_gateway import _settings, _token
from tests.egress.test_gateway_admission import OURS, _raw_request, _with_egress

MIB = 1024 * 1024


def _ledger_rows(tmp_path: Path) -> list[tuple[str, str, str, int, int]]:
    db = sqlite3.connect(tmp_path / "state" / "egress.sqlite")
    try:
        return db.execute("SELECT kind, outcome, rule, status, bytes FROM egress ORDER BY id").fetchall()
    finally:
        db.close()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def _prefix(url: str) -> str:
    """The gateway's secret path prefix, ``/<32 hex>/execution/``."""
    return urlsplit(url).path


def _head(port: int, request_line: str, *extra: str) -> bytes:
    lines = [request_line, f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {_token(OURS)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_2gb_content_length_is_refused_before_any_body_is_read(tmp_path: Path) -> None:
    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> None:
        port = _port(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A 2 GB Variable.set whose body never comes: the answer must not wait for it.
        writer.write(_head(port, f"PUT {_prefix(url)}variables/huge HTTP/1.1", "Content-Type: application/json",
                           "Content-Length: 2000000000"))
        await writer.drain()
        status, body = await asyncio.wait_for(_read_answer(reader), 15)
        writer.close()
        assert status == 413, body
        detail = body.decode()
        assert "max_variable_bytes" in detail and "2,000,000,000" in detail and "1,048,576" in detail, detail
        assert "'huge'" in detail and "announces" in detail, detail
        assert seen == []

    asyncio.run(_with_egress(tmp_path, fn))
    assert _ledger_rows(tmp_path) == [("variable", "refused", "max_variable_bytes", 413, 2_000_000_000)]


def test_a_chunked_body_is_read_only_up_to_the_cap_and_rss_stays_flat(tmp_path: Path) -> None:
    """128 MiB streamed without Content-Length at the default 1 MiB cap: answered 413 after the
    first 2 MiB; the rest is discarded as it arrives, and the process that runs the gateway (this
    one) does not grow by the body."""
    chunk = b"x" * MIB
    proc = psutil.Process()

    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> None:
        port = _port(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        gc.collect()
        before = proc.memory_info().rss
        writer.write(_head(port, f"PUT {_prefix(url)}variables/streamed HTTP/1.1", "Transfer-Encoding: chunked"))
        for _ in range(2):
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        # The answer comes while the body is still being sent: it does not wait for the end.
        status, body = await asyncio.wait_for(_read_answer(reader), 15)
        assert status == 413, body
        assert "max_variable_bytes" in body.decode() and "runs past" in body.decode(), body
        for _ in range(126):
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        # The same connection answers the next request: the gateway went through all 128 MiB.
        writer.write(_head(port, f"GET {_prefix(url)}variables/small HTTP/1.1"))
        await writer.drain()
        status, body = await asyncio.wait_for(_read_answer(reader), 60)
        grown = proc.memory_info().rss - before
        writer.close()
        assert status == 200, body
        assert grown < 24 * MIB, f"RSS grew {grown / MIB:.1f} MiB while a 128 MiB chunked body was refused"
        assert len(seen) == 1 and seen[0].method == "GET"

    asyncio.run(_with_egress(tmp_path, fn))
    (kind, outcome, rule, status, size), _sent = _ledger_rows(tmp_path)
    assert (kind, outcome, rule, status) == ("variable", "refused", "max_variable_bytes", 413)
    assert MIB < size <= 2 * MIB


@pytest.mark.parametrize(("method", "path", "flag", "rule", "what"), [
    ("PUT", "variables/api_key", "max_variable_bytes", "max_variable_bytes", "Variable 'api_key'"),
    ("PATCH", f"task-instances/{OURS}/state", "max_asset_event_bytes", "max_asset_event_bytes", "asset events"),
    ("POST", "dag-runs/target_dag/manual__1", "max_dagrun_conf_bytes", "max_dagrun_conf_bytes", "DAG run trigger"),
    ("PATCH", f"hitlDetails/{OURS}", "max_hitl_bytes", "max_hitl_bytes", "human-in-the-loop response"),
    ("POST", "xcoms/d/r/t/return_value", "max_xcom_bytes", "max_xcom_bytes", "XCom 'return_value'"),
])
def test_each_write_kind_has_its_own_cap(tmp_path: Path, method: str, path: str, flag: str, rule: str, what: str) -> None:
    async def fn(url: str, egress: Egress, seen: list[httpx.Request]) -> None:
        auth = {"Authorization": f"Bearer {_token(OURS)}", "Content-Type": "application/json"}
        status, body = await _raw_request(url, f"{method} {_prefix(url)}{path} HTTP/1.1", auth, b"x" * 1001)
        assert status == 413, body
        detail = body.decode()
        assert rule in detail and what in detail and "1,001 bytes" in detail and "1,000 bytes" in detail, detail
        assert seen == []
        status, body = await _raw_request(url, f"{method} {_prefix(url)}{path} HTTP/1.1", auth, b"x" * 1000)
        assert status == 200 and len(seen) == 1, body  # at the cap: forwarded

    asyncio.run(_with_egress(tmp_path, fn, **{flag: 1000}))
    rows = _ledger_rows(tmp_path)
    assert [r[:4] for r in rows if r[1] == "refused"] == [(rows[0][0], "refused", rule, 413)]


def test_no_request_is_read_past_the_largest_cap() -> None:
    policy = Policy(max_xcom_bytes=10, max_variable_bytes=20, max_asset_event_bytes=30, max_dagrun_conf_bytes=40,
                    max_hitl_bytes=50)
    assert policy.max_body_bytes == 50
    assert policy.cap_for("variable", "PUT") == ("max_variable_bytes", 20)
    assert policy.cap_for("variable", "GET") == ("max_body_bytes", 50)  # a read has no body of its own to cap
    assert policy.cap_for("rendered-fields", "PUT") == ("max_body_bytes", 50)
    refusal = policy.check("rendered-fields", "PUT", "task-instances/x/rtif", 51)
    assert refusal is not None and refusal.status == 413 and refusal.rule == "max_body_bytes"
    assert Policy(max_xcom_bytes=0).cap_for("xcom", "POST") == ("max_body_bytes", MAX_BODY_BYTES)  # 0 = no cap of its own


def test_caps_are_settings_with_checked_values(tmp_path: Path) -> None:
    from airflow_outpost.worker.errors import ConfigError

    s = _settings(tmp_path, max_variable_bytes="2048", max_hitl_bytes="0")
    assert (s.max_variable_bytes, s.max_hitl_bytes, s.max_dagrun_conf_bytes) == (2048, 0, 1_048_576)
    with pytest.raises(ConfigError, match="max_asset_event_bytes"):
        _settings(tmp_path, max_asset_event_bytes="-1")
