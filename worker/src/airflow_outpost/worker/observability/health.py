"""Health and metrics endpoint inside the worker process (loopback by default).

* ``GET /healthz``: 200 while the process and its event loop are alive.
* ``GET /readyz``: 200 when registered with the control plane and the last heartbeat reached it;
  503 with the reason otherwise (starting, control plane unreachable, draining).
* ``GET /metrics``: Prometheus text format (see :mod:`airflow_outpost.worker.observability.prometheus`).

A minimal HTTP/1.0 server on ``asyncio.start_server`` in the worker's own loop: one request per
connection, GET/HEAD only, so it needs no web framework and never competes with the worker for a
thread. ``start()`` failing to bind is logged, not fatal: the worker's job is running tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


class HealthServer:
    """Serves the endpoints. ``start()``/``aclose()``; ``aclose()`` is safe twice and before start.

    ``readiness()`` returns ``(ready, reason)`` for ``/readyz``; ``metrics()`` the ``/metrics`` body.
    Both are called once per request, in the event loop.
    """

    def __init__(self, host: str, port: int, *, readiness: Callable[[], tuple[bool, str]],
                 metrics: Callable[[], bytes]) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str | None:
        """``http://host:port`` actually bound, or ``None`` when not serving."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            log.error("health/metrics server not started: cannot listen on %s:%d (%s); "
                      "set metrics_port to a free port, or 0 to turn it off", self.host, self.port, exc)
            return
        log.info("health and metrics on %s (/healthz /readyz /metrics)", self.url)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, head_only = await self._respond(reader)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.0 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + (b"" if head_only else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        method = request.split(b" ", 1)[0]
        status, ctype, body = self._route(request)
        return status, ctype, body, method == b"HEAD"

    def _route(self, request: bytes) -> tuple[int, str, bytes]:
        if len(request) > MAX_REQUEST_BYTES:
            return 400, "text/plain", b"request too large\n"
        parts = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET or HEAD only\n"
        path = target.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = self.readiness()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE_LATEST, self.metrics()
            except Exception:  # a broken collector must not take the endpoint down: say so, keep serving
                log.exception("rendering /metrics failed")
                return 500, "text/plain", b"metrics collection failed; see the worker log\n"
        return 404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n"
