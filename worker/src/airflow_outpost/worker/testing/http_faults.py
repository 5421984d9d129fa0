"""A loopback HTTP reverse proxy that refuses a share of chosen requests, like a flaky link or a
load balancer in front of the control plane.

``FaultyHttpProxy(target, fail_rate=0.3, refuse=lambda method, path: ...)`` answers 503 to about
``fail_rate`` of the requests ``refuse`` picks, without forwarding them (the server never sees a
refused request), and forwards everything else unchanged. It counts what it forwarded and refused.
Runs uvicorn (an Airflow dependency, so in the ``dev`` extra) in a thread; listens on 127.0.0.1 only.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

# Headers that belong to one connection, not to the message (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"proxy-connection", b"host"})


def log_pushes(method: str, path: str) -> bool:
    """Edge API log pushes (``POST .../edge_worker/v1/logs/push/...``)."""
    return method in ("POST", "PUT") and "/logs/push/" in path


class FaultyHttpProxy:
    """Forwards ``http://127.0.0.1:<port>`` to ``target``; ``start()``/``stop()``, ``stop()`` safe twice."""

    def __init__(self, target: str, *, fail_rate: float, refuse: Callable[[str, str], bool] = log_pushes,
                 seed: int | None = None) -> None:
        import uvicorn

        self.target = target.rstrip("/")
        self.fail_rate = fail_rate
        self.refuse = refuse
        self.forwarded = 0
        self.refused = 0
        self.matched = 0
        self._rng = random.Random(seed)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self._app, log_level="warning", lifespan="off", interface="asgi3",
                                                     timeout_keep_alive=30))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="faulty http proxy", daemon=True)
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> FaultyHttpProxy:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"proxy did not start within {timeout_s}s")

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(10)
        self._sock.close()

    async def _app(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.refuse(method, path):
            self.matched += 1
            if self._rng.random() < self.fail_rate:
                self.refused += 1
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"17")]})
                await send({"type": "http.response.body", "body": b"injected by proxy"})
                return
        if self._client is None:  # created on the server's own loop
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(120.0))
        query = scope.get("query_string", b"")
        url = self.target + scope.get("raw_path", path.encode()).decode() + (f"?{query.decode()}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        try:
            resp = await self._client.send(self._client.build_request(method, url, headers=headers, content=body),
                                           stream=True)
        except httpx.HTTPError:
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            raw = b"".join([chunk async for chunk in resp.aiter_raw()])  # as sent: still encoded
        finally:
            await resp.aclose()
        self.forwarded += 1
        out = [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP_BY_HOP and k.lower() != b"content-length"]
        out.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        await send({"type": "http.response.body", "body": raw})

