"""The scaler's HTTP endpoints (HTTP/1.0, one request per connection, GET/HEAD only).

* ``GET /scale?concurrency=N``: the JSON KEDA's ``metrics-api`` scaler reads, e.g.
  ``{"concurrency": 4, "age_s": 1.2, "queues": {"gpu": {"queued": 30, "running": 0, "queued_slots": 30,
  "running_slots": 0, "slots": 30, "workers": 8}}}``; point ``valueLocation`` at
  ``queues.<queue>.workers``. ``N`` defaults to the ``concurrency`` setting. 503 with
  ``{"error": why}`` when no fresh value exists (KEDA counts it as a failed scrape and holds).
* ``GET /healthz``: 200 ``ok: ...`` or 503 with why (control plane unreachable since when, last error).
* ``GET /metrics``: Prometheus text (no REST call of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from airflow_outpost.worker.scaler.service import Scaler, Unavailable
from airflow_outpost.worker.scaler.settings import MAX_CONCURRENCY

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}
JSON = "application/json"


class ScalerServer:
    """``start()`` binds (raises ``OSError`` if it cannot: serving is the scaler's only job);
    ``aclose()`` is safe twice and before start."""

    def __init__(self, scaler: Scaler, host: str, port: int, *, default_concurrency: int) -> None:
        self.scaler, self.host, self.port = scaler, host, port
        self.default_concurrency = default_concurrency
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("scaler on %s (/scale /healthz /metrics)", self.url)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, ctype, body = await self._route(request)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + (b"" if request.startswith(b"HEAD ") else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _route(self, request: bytes) -> tuple[int, str, bytes]:
        if len(request) > MAX_REQUEST_BYTES:
            return 400, "text/plain", b"request too large\n"
        parts = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET or HEAD only\n"
        url = urlsplit(target)
        if url.path == "/healthz":
            ok, why = await self.scaler.health()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if url.path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.scaler.metrics()
        if url.path == "/scale":
            return await self._scale(parse_qs(url.query))
        return 404, "text/plain", b"not found: try /scale, /healthz or /metrics\n"

    async def _scale(self, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        raw = query.get("concurrency", [str(self.default_concurrency)])[-1]
        try:
            concurrency = int(raw)
        except ValueError:
            concurrency = 0
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            return 400, JSON, _json({"error": f"concurrency={raw!r}: an integer from 1 to {MAX_CONCURRENCY}"})
        try:
            snap = await self.scaler.current()
        except Unavailable as exc:
            return 503, JSON, _json({"error": str(exc)})
        return 200, JSON, _json(snap.document(concurrency, self.scaler.wall()))


def _json(doc: object) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()
