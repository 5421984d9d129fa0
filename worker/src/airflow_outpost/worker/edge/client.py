"""A thin async client for the Edge worker API of ``apache-airflow-providers-edge3``.

Endpoints are grouped by resource, as in the Task SDK's client: ``client.worker.register``,
``client.jobs.fetch``, ``client.jobs.set_state``, ``client.logs.push``. Authentication, error
mapping and request accounting live in :meth:`EdgeClient.request`; nothing else touches HTTP.

Retries: :meth:`EdgeClient.request` raises at once; callers decide how long an operation may be
retried with :func:`retry` (jittered exponential backoff), which only retries errors whose
``retryable`` is true (connection errors, timeouts, 5xx, 429). A 4xx is reported, not retried.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import jwt
from jwt.warnings import InsecureKeyLengthWarning

from airflow_outpost.worker.config import Settings
from airflow_outpost.worker.edge.auth import build_auth, control_plane_ssl
from airflow_outpost.worker.edge.jobs import MAX_JOB_BYTES, JobKey
from airflow_outpost.worker.edge.request_counter import RequestCounter
from airflow_outpost.worker.errors import (
    AuthError,
    ConnectError,
    CredentialError,
    DuplicateWorkerError,
    JobRejected,
    NotFoundError,
    OutpostError,
    ServerError,
    TransientServerError,
    VersionMismatchError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class SharedSecretAuth:
    """Signs each Edge API request like the stock worker: HS512 JWT, ``aud=api``, ``method=<path>``.

    The server checks that the signed ``method`` equals the requested path, so a token is
    minted per request; they live ``valid_for_s`` seconds.
    """

    def __init__(self, secret: Callable[[], str | None], issuer: str | None = None, valid_for_s: int = 30):
        self._secret, self._issuer, self._valid_for_s = secret, issuer, valid_for_s

    def header(self, method_path: str) -> str:
        try:
            secret = self._secret()
        except OSError as exc:
            raise CredentialError(f"the shared secret cannot be read: {exc}") from exc
        if not secret:
            raise CredentialError(
                "no credentials: set jwt_secret (OUTPOST_JWT_SECRET) or jwt_secret_file to the control "
                "plane's [api_auth] jwt_secret"
            )
        now = int(time.time())
        claims: dict[str, Any] = {
            "jti": uuid.uuid4().hex, "aud": "api", "nbf": now, "iat": now,
            "exp": now + self._valid_for_s, "method": method_path,
        }
        if self._issuer:
            claims["iss"] = self._issuer
        with warnings.catch_warnings():
            # The key length is the control plane's choice ([api_auth] jwt_secret), not ours.
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return jwt.encode(claims, secret, algorithm="HS512")


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:500]


class EdgeClient:
    """Async client for one control plane. ``aclose()`` is safe twice."""

    def __init__(
        self,
        settings: Settings,
        *,
        counter: RequestCounter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        auth: SharedSecretAuth | None = None,
        recorder: Callable[[str, str, bytes | None, int | None, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.counter = counter or RequestCounter()
        self.auth = auth or build_auth(settings)
        # Egress ledger hook: recorder(method, path, body, status or None, bytes received).
        self.recorder = recorder
        self._http = httpx.AsyncClient(
            base_url=settings.api_url,
            verify=control_plane_ssl(settings),
            timeout=httpx.Timeout(settings.request_timeout_s, connect=min(10.0, settings.request_timeout_s)),
            transport=transport,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers={"Accept": "application/json", "User-Agent": "airflow-outpost"},
        )
        self.worker = _Worker(self)
        self.jobs = _Jobs(self)
        self.logs = _Logs(self)

    async def aclose(self) -> None:
        await self._http.aclose()
        close = getattr(self.auth, "aclose", None)  # an OAuth2 authenticator holds its own client
        if close is not None:
            await close()

    async def request(self, method: str, edge_path: str, body: Any = None, *, edge: bool = True,
                      max_bytes: int | None = None) -> Any:
        """Send one request; return the decoded JSON (``None`` for an empty body) or raise.

        ``max_bytes`` marks an untrusted reply (a fetched job): one longer than that (decoded) is
        refused unread, and one that is not JSON is refused, both with :class:`JobRejected`.
        """
        path = f"/edge_worker/v1/{edge_path}" if edge else edge_path
        headers = {}
        if edge:
            # The server compares the signed method with the *decoded* request path.
            header = self.auth.header(unquote(edge_path))
            headers["Authorization"] = (await header) if inspect.isawaitable(header) else header
        content: bytes | None = None
        if body is not None:
            text = body if isinstance(body, (str, bytes)) else json.dumps(body, default=str)
            content = text.encode() if isinstance(text, str) else text
            headers["Content-Type"] = "application/json"
        self.counter.record()
        try:
            resp = await self._send(method, path, content, headers, max_bytes)
        except httpx.TimeoutException as exc:
            self._record(method, path, content, None, 0)
            raise ConnectError(f"{method} {path}: timed out after {self.settings.request_timeout_s}s") from exc
        except httpx.TransportError as exc:
            self._record(method, path, content, None, 0)
            raise ConnectError(f"{method} {path}: cannot reach {self.settings.api_url} ({exc})") from exc
        self._record(method, path, content, resp.status_code, len(resp.content))
        if resp.status_code >= 400:
            raise _map_error(resp.status_code, method, path, _detail(resp))
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            if max_bytes is not None:  # an untrusted reply (a fetched job): refuse it as such
                raise JobRejected(f"{method} {path}: reply is not JSON: {resp.text[:120]!r}") from exc
            raise ServerError(resp.status_code, method, path, f"response is not JSON: {resp.text[:200]!r}") from exc

    async def _send(self, method: str, path: str, content: bytes | None, headers: dict[str, str],
                    max_bytes: int | None) -> httpx.Response:
        if max_bytes is None:
            return await self._http.request(method, path, content=content, headers=headers)
        request = self._http.build_request(method, path, content=content, headers=headers)
        resp = await self._http.send(request, stream=True)
        try:
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise JobRejected(f"{method} {path}: reply of {int(declared):,} bytes exceeds the limit of {max_bytes:,} bytes")
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise JobRejected(f"{method} {path}: reply exceeds the limit of {max_bytes:,} bytes")
        finally:
            await resp.aclose()
        plain = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(resp.status_code, headers=plain, content=bytes(data), request=request)

    def _record(self, method: str, path: str, body: bytes | None, status: int | None, bytes_in: int) -> None:
        if self.recorder is not None:
            self.recorder(method, path, body, status, bytes_in)

    async def server_version(self) -> str:
        """The Airflow version the API server reports (public ``/api/v2/version``)."""
        data = await self.request("GET", "/api/v2/version", edge=False)
        if not isinstance(data, dict) or "version" not in data:
            raise ServerError(200, "GET", "/api/v2/version", f"not an Airflow API server: {data!r:.200}")
        return str(data["version"])

    async def serves_execution_api(self, api_version: str) -> bool | None:
        """Whether the server's Task Execution API serves ``api_version`` (Cadwyn publishes one
        OpenAPI document per version it knows, without authentication). None: it could not tell
        (the document is not reachable here, e.g. behind a proxy that only routes the API)."""
        url = f"{self.settings.execution_api.rstrip('/')}/openapi.json?version={quote(api_version)}"
        try:
            await self.request("GET", url, edge=False)
        except ConnectError as exc:
            # A freshly started API server builds each version's document on first request (seconds
            # on a small machine): a slow answer is no reason to refuse to start; edge3's own
            # version check still runs at registration.
            log.warning("cannot check the control plane's Execution API versions (%s); going on", exc)
            return None
        except ServerError as exc:
            # Cadwyn's own 404 names the version ("OpenApi file of with version `...` not found").
            if isinstance(exc, NotFoundError) and api_version in exc.detail:
                return False
            log.warning("cannot check the control plane's Execution API versions (%s)", exc)
            return None
        return True


def _map_error(status: int, method: str, path: str, detail: str) -> ServerError:
    if status >= 500 or status == 429:
        return TransientServerError(status, method, path, detail)
    if status in (401, 403):
        return AuthError(status, method, path, detail)
    if status == 409:
        return DuplicateWorkerError(status, method, path, detail)
    if status == 400:
        return VersionMismatchError(status, method, path, detail)
    if status in (404, 405):
        return NotFoundError(status, method, path, detail)
    return ServerError(status, method, path, detail)


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float | None,
    base_s: float = 0.5,
    cap_s: float = 30.0,
    on_retry: Callable[[OutpostError, float], None] | None = None,
) -> T:
    """Run ``op`` until it succeeds, a non-retryable error occurs, or ``deadline_s`` passes.

    Backoff is "full jitter" exponential (AWS architecture blog): sleep uniform(0, min(cap,
    base * 2**n)). ``deadline_s=None`` retries forever (cancel the task to stop it). The last
    error is re-raised when the deadline passes.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return await op()
        except OutpostError as exc:
            if not exc.retryable:
                raise
            attempt += 1
            delay = random.uniform(base_s / 2, min(cap_s, base_s * 2**attempt))
            if deadline_s is not None and time.monotonic() - start + delay > deadline_s:
                raise
            if on_retry:
                on_retry(exc, delay)
            else:
                log.warning("%s failed (%s); retry %d in %.1fs", what, exc, attempt, delay)
            await asyncio.sleep(delay)


class _Resource:
    def __init__(self, client: EdgeClient) -> None:
        self._c = client


class _Worker(_Resource):
    async def register(self, name: str, state: str, queues: list[str] | None, sysinfo: dict, team: str | None) -> dict:
        body = {"state": state, "jobs_active": 0, "queues": queues, "sysinfo": sysinfo}
        if team:
            body["team_name"] = team
        return await self._c.request("POST", f"worker/{quote(name)}", body)

    async def set_state(
        self, name: str, state: str, jobs_active: int, queues: list[str] | None, sysinfo: dict,
        maintenance_comments: str | None = None, team: str | None = None,
    ) -> dict:
        """Heartbeat: report state; the reply carries the server's view (maintenance, shutdown, ...)."""
        body: dict[str, Any] = {"state": state, "jobs_active": jobs_active, "queues": queues, "sysinfo": sysinfo}
        if maintenance_comments is not None:
            body["maintenance_comments"] = maintenance_comments
        if team:
            body["team_name"] = team
        return await self._c.request("PATCH", f"worker/{quote(name)}", body)


class _Jobs(_Resource):
    async def fetch(self, name: str, queues: list[str] | None, free_concurrency: int, team: str | None) -> Any:
        """Claim at most one queued job that fits ``free_concurrency``; ``None`` when there is none."""
        body: dict[str, Any] = {"queues": queues, "free_concurrency": free_concurrency, "supports_task_instance_uuid": True}
        if team:
            body["team_name"] = team
        return await self._c.request("POST", f"jobs/fetch/{quote(name)}", body, max_bytes=MAX_JOB_BYTES)

    async def set_state(self, key: JobKey, state: str) -> None:
        """Report a job's state. Idempotent on the server: reporting the same state twice is harmless."""
        path = (
            f"jobs/state/{quote(key.dag_id, safe='')}/{quote(key.task_id, safe='')}/"
            f"{quote(key.run_id, safe='')}/{key.try_number}/{key.map_index}/{state}"
        )
        body = {"task_instance_id": key.task_instance_id} if key.task_instance_id else None
        await self._c.request("PATCH", path, body)


class _Logs(_Resource):
    async def push(self, key: JobKey, chunk: str, chunk_time: str) -> None:
        path = (
            f"logs/push/{quote(key.dag_id, safe='')}/{quote(key.task_id, safe='')}/"
            f"{quote(key.run_id, safe='')}/{key.try_number}/{key.map_index}"
        )
        body: dict[str, Any] = {"log_chunk_time": chunk_time, "log_chunk_data": chunk}
        if key.task_instance_id:
            body["task_instance_id"] = key.task_instance_id
        await self._c.request("POST", path, body)

