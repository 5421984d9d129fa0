"""A minimal HTTP/1.0 GET/HEAD server on ``asyncio.start_server``, for the worker's health endpoint and
the scaler: one request per connection, no web framework, no thread of its own.

The owner gives it a ``route(path, query)`` coroutine that returns ``(status, content type, body)``;
the request line, size limit, methods, HEAD and the response framing are handled here once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

MAX_REQUEST_BYTES = 8192
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
           503: "Service Unavailable"}
Route = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]


class GetEndpoint:
    """Serves ``route`` on ``host:port``. ``start()`` raises ``OSError`` if it cannot bind (the owner
    decides whether that is fatal); ``aclose()`` is safe twice and before start."""

    def __init__(self, host: str, port: int, route: Route) -> None:
        self.host, self.port = host, port
        self._route = route
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str | None:
        """``http://host:port`` actually bound, or ``None`` when not serving."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, ctype, body = await self._dispatch(request)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        head = (f"HTTP/1.0 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + (b"" if request.startswith(b"HEAD ") else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: bytes) -> tuple[int, str, bytes]:
        if len(request) > MAX_REQUEST_BYTES:
            return 400, "text/plain", b"request too large\n"
        parts = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET or HEAD only\n"
        path, _, query = target.partition("?")
        return await self._route(path, query)
