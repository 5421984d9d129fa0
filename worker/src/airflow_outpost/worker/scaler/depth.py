"""Queue depth from the control plane's public REST API (``/api/v2``), read-only.

One round is ``GET /api/v2/dags/~/dagRuns/~/taskInstances?state=queued&state=running`` (every DAG,
every run; ``queue=`` filters when the scaler is limited to some queues), paged by 100 in ``id``
order, summing each task instance's ``pool_slots`` per queue: a task with ``pool_slots=2`` takes two
of a worker's slots (the Edge executor's ``concurrency_slots``). The GET list is used rather than
the ``POST .../taskInstances/list`` batch endpoint because the batch endpoint writes an audit-log
row per call, and the scaler must not write to the control plane's database every few seconds.

Authentication: :class:`TokenSource` presents a bearer token from a file (re-read when it changes,
so a sidecar or CronJob may refresh it) or one obtained from the auth manager's ``POST
/auth/token`` with a user name and a password file, renewed before it expires and after a 401.

Errors: no answer, a timeout or a 5xx raise :class:`ConnectError`/:class:`TransientServerError`
(retryable: the next refresh tries again); 401/403 raise :class:`AuthError` (reported, not retried
within the round).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from airflow_outpost.worker.edge.tokens import claims
from airflow_outpost.worker.errors import AuthError, ConnectError, CredentialError, ServerError, TransientServerError

STATES = ("queued", "running")
PAGE_LIMIT = 100  # the API server's default [api] maximum_page_limit
MAX_PAGES = 1000  # 100,000 task instances: a runaway pager is a bug, not a backlog
TOKEN_RENEW_BEFORE_S = 60.0


@dataclass(frozen=True)
class QueueDepth:
    """Task instances and the slots they take on one queue, queued (waiting for a worker) and running."""

    queued: int = 0
    running: int = 0
    queued_slots: int = 0
    running_slots: int = 0

    @property
    def slots(self) -> int:
        return self.queued_slots + self.running_slots

    def workers(self, concurrency: int) -> int:
        """Workers of ``concurrency`` slots needed to run every queued and running task at once."""
        return -(-self.slots // concurrency)  # ceil without floats


class TokenSource:
    """The bearer token for the REST API: from ``token_file``, or from ``/auth/token`` with a user
    name and ``password_file``. ``invalidate()`` after a 401 makes the next ``token()`` fetch anew."""

    def __init__(self, *, token_file: Path | None = None, username: str | None = None,
                 password_file: Path | None = None) -> None:
        self.token_file, self.username, self.password_file = token_file, username, password_file
        self._token: str | None = None
        self._expires = 0.0

    def invalidate(self) -> None:
        self._token, self._expires = None, 0.0

    async def token(self, client: httpx.AsyncClient) -> str:
        if self.token_file is not None:
            return _read(self.token_file, "token_file")  # re-read: whoever refreshes it, we follow
        if self._token is not None and time.time() < self._expires - TOKEN_RENEW_BEFORE_S:
            return self._token
        assert self.password_file is not None
        body = {"username": self.username, "password": _read(self.password_file, "password_file")}
        try:
            resp = await client.post("/auth/token", json=body)
        except httpx.TransportError as exc:
            raise ConnectError(f"POST /auth/token: {type(exc).__name__}: {exc}") from exc
        _raise_for_status(resp, "POST", "/auth/token")
        try:
            token = str(resp.json()["access_token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerError(resp.status_code, "POST", "/auth/token", "no access_token in the answer") from exc
        exp = (claims(token) or {}).get("exp")
        self._token = token
        self._expires = float(exp) if isinstance(exp, (int, float)) else time.time() + 300
        return token


def _read(path: Path, setting: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"{setting} {path} cannot be read: {exc.strerror}") from exc
    if not text:
        raise CredentialError(f"{setting} {path} is empty")
    return text


def _raise_for_status(resp: httpx.Response, method: str, path: str) -> None:
    if resp.is_success:
        return
    detail = resp.text[:300]
    if resp.status_code in (401, 403):
        raise AuthError(resp.status_code, method, path, detail)
    if resp.status_code >= 500 or resp.status_code == 429:
        raise TransientServerError(resp.status_code, method, path, detail)
    raise ServerError(resp.status_code, method, path, detail)


class QueueDepthReader:
    """Counts queued and running task instances per queue. ``aclose()`` is safe twice."""

    def __init__(self, api_url: str, tokens: TokenSource, *, timeout_s: float = 10.0,
                 verify: str | bool = True, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.tokens = tokens
        self._client = httpx.AsyncClient(base_url=api_url.rstrip("/"), timeout=timeout_s, verify=verify,
                                         transport=transport)
        self.requests = 0  # REST calls made, for /metrics and the rate-limit tests

    async def aclose(self) -> None:
        await self._client.aclose()

    async def read(self, queues: tuple[str, ...] = ()) -> dict[str, QueueDepth]:
        """One consistent-enough round: every page of queued and running task instances (of
        ``queues`` if given, else of every queue). Tasks that change state between two pages may be
        counted twice or missed once; the next round corrects it."""
        counts: dict[str, list[int]] = {}
        offset = 0
        for _ in range(MAX_PAGES):
            params: list[tuple[str, str | int]] = [("state", s) for s in STATES]
            params += [("queue", q) for q in queues]
            params += [("limit", PAGE_LIMIT), ("offset", offset), ("order_by", "id")]
            page = await self._get("/api/v2/dags/~/dagRuns/~/taskInstances", params)
            tis = page.get("task_instances") or []
            for ti in tis:
                c = counts.setdefault(str(ti.get("queue") or "default"), [0, 0, 0, 0])
                slots = ti.get("pool_slots") or 1
                running = ti.get("state") == "running"
                c[1 if running else 0] += 1
                c[3 if running else 2] += int(slots)
            offset += len(tis)
            if not tis or offset >= int(page.get("total_entries") or 0):
                break
        return {q: QueueDepth(*c) for q, c in counts.items()}

    async def _get(self, path: str, params: list[tuple[str, str | int]]) -> dict[str, Any]:
        for attempt in (1, 2):
            token = await self.tokens.token(self._client)
            self.requests += 1
            try:
                resp = await self._client.get(path, params=[(k, v) for k, v in params], headers={"Authorization": f"Bearer {token}"})
            except httpx.TransportError as exc:
                raise ConnectError(f"GET {path}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code == 401 and attempt == 1 and self.tokens.token_file is None:
                self.tokens.invalidate()  # expired early or revoked: one fresh token, then report
                continue
            _raise_for_status(resp, "GET", path)
            try:
                data = resp.json()
            except ValueError as exc:
                raise TransientServerError(resp.status_code, "GET", path, "the answer is not JSON") from exc
            if not isinstance(data, dict):
                raise TransientServerError(resp.status_code, "GET", path, "the answer is not a JSON object")
            return data
        raise AssertionError("unreachable")  # pragma: no cover
