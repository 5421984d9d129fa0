"""The scaler's HTTP endpoints (on :class:`~airflow_outpost.worker.observability.http_endpoint.GetEndpoint`).

* ``GET /scale?concurrency=N``: the JSON KEDA's ``metrics-api`` scaler reads, e.g.
  ``{"concurrency": 4, "age_s": 1.2, "queues": {"gpu": {"queued": 30, "running": 0, "queued_slots": 30,
  "running_slots": 0, "slots": 30, "workers": 8}}}``; point ``valueLocation`` at
  ``queues.<queue>.workers``. ``N`` defaults to the ``concurrency`` setting. 503 with
  ``{"error": why}`` when no fresh value exists (KEDA counts it as a failed scrape and holds).
* ``GET /healthz``: 200 ``ok: ...`` or 503 with why (control plane unreachable since when, last error).
* ``GET /metrics``: Prometheus text (no REST call of its own).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST

from airflow_outpost.worker.observability.http_endpoint import GetEndpoint
from airflow_outpost.worker.scaler.service import Scaler, Unavailable
from airflow_outpost.worker.scaler.settings import MAX_CONCURRENCY

log = logging.getLogger(__name__)
JSON = "application/json"


class ScalerServer:
    """``start()`` binds (raises ``OSError`` if it cannot: serving is the scaler's only job);
    ``aclose()`` is safe twice and before start."""

    def __init__(self, scaler: Scaler, host: str, port: int, *, default_concurrency: int) -> None:
        self.scaler, self.host, self.port = scaler, host, port
        self.default_concurrency = default_concurrency
        self._endpoint = GetEndpoint(host, port, self._route)

    @property
    def url(self) -> str | None:
        return self._endpoint.url

    async def start(self) -> None:
        await self._endpoint.start()
        log.info("scaler on %s (/scale /healthz /metrics)", self.url)

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    async def _route(self, path: str, query: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            ok, why = await self.scaler.health()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.scaler.metrics()
        if path == "/scale":
            return await self._scale(parse_qs(query))
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
