"""Health and metrics endpoint inside the worker process (loopback by default).

* ``GET /healthz``: 200 while the process and its event loop are alive.
* ``GET /readyz``: 200 when registered with the control plane and the last heartbeat reached it;
  503 with the reason otherwise (starting, control plane unreachable, draining).
* ``GET /metrics``: Prometheus text format (see :mod:`airflow_outpost.worker.observability.prometheus`).

A minimal HTTP/1.0 server in the worker's own loop
(:class:`~airflow_outpost.worker.observability.http_endpoint.GetEndpoint`), so it needs no web framework
and never competes with the worker for a thread. ``start()`` failing to bind is logged, not fatal: the
worker's job is running tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST

from airflow_outpost.worker.observability.http_endpoint import GetEndpoint

log = logging.getLogger(__name__)


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
        self._endpoint = GetEndpoint(host, port, self._route)

    @property
    def url(self) -> str | None:
        """``http://host:port`` actually bound, or ``None`` when not serving."""
        return self._endpoint.url

    async def start(self) -> None:
        try:
            await self._endpoint.start()
        except OSError as exc:
            log.error("health/metrics server not started: cannot listen on %s:%d (%s); "
                      "set metrics_port to a free port, or 0 to turn it off", self.host, self.port, exc)
            return
        log.info("health and metrics on %s (/healthz /readyz /metrics)", self.url)

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    async def _route(self, path: str, query: str) -> tuple[int, str, bytes]:
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
