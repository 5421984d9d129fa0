"""Forwarding a task's request to the control plane's Execution API, and streaming the answer back.

:class:`Upstream` owns the pooled ``httpx.AsyncClient`` side of the egress gateway: plain
forwarding (holding requests through an outage, :mod:`airflow_outpost.worker.egress.outage`),
a start confirmed by a heartbeat (``confirm_start_s``), and the replayed start of a try resuming
from a local trigger. The gateway (:mod:`airflow_outpost.worker.egress.gateway`) decides what may
be forwarded and ledgers it; this module only talks to the upstream and answers the task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from airflow_outpost.worker.egress.outage import OUTAGE_STATUSES, Outage

log = logging.getLogger(__name__)

_TI_RUN = re.compile(r"^task-instances/([^/]+)/run$")
_TI_HEARTBEAT = re.compile(r"^task-instances/([^/]+)/heartbeat$")
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})



def running_elsewhere(method: str, path: str, answer: bytes) -> str | None:
    """The task instance id if a 409 says this try belongs to another worker, else ``None``.

    Either the server refused to start it (``PATCH .../run``), or a heartbeat was answered
    ``running_elsewhere``: the same job was handed to two workers and the other one runs it.
    """
    if method == "PATCH" and (m := _TI_RUN.match(path)):
        return m.group(1)
    if method == "PUT" and (m := _TI_HEARTBEAT.match(path)):
        try:
            if answer[:2] == b"\x1f\x8b":  # the API server gzips even small answers when asked to
                answer = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(answer)
            detail = json.loads(answer).get("detail")
        except (ValueError, AttributeError, zlib.error):
            return None
        if isinstance(detail, dict) and detail.get("reason") == "running_elsewhere":
            return m.group(1)
    return None


@dataclass(frozen=True)
class Resume:
    """How a try resumes after its local trigger ended: its first start request, replayed, and
    the method and kwargs the Task SDK is to resume with (``__fail__`` to fail it)."""

    run_body: dict[str, Any]
    next_method: str
    next_kwargs: Any


class Upstream:
    """The control plane's Execution API as the gateway reaches it (the worker's client and TLS)."""

    def __init__(self, client: httpx.AsyncClient, outage: Outage, on_start_refused: Callable[[str], None]) -> None:
        self._http = client
        self._outage = outage
        self._on_start_refused = on_start_refused

    async def resume_start(self, send: Any, url: str, headers: list[tuple[str, str]],
                            resume: Resume) -> tuple[int | None, int, bytes]:
        """Start a try again after its local trigger fired, as Airflow's resume from deferral would.

        The server still runs the try (it never saw the deferral), so the try's first start is
        sent again: the same hostname, unixname, pid and start date make it a duplicate start the
        server answers with the try's context, changing nothing. Into that answer go the
        ``next_method``/``next_kwargs`` Airflow's triggerer would have stored, and no XCom keys to
        clear (the first run's XComs stay, as after a deferral). A 404/409 (the try was marked
        failed or cleared meanwhile) reaches the Task SDK unchanged, which then does not run it.
        """
        try:
            resp = await self._http.request("PATCH", url, headers=headers, content=json.dumps(resume.run_body).encode())
        except httpx.HTTPError as exc:  # the Task SDK retries a 502
            await reply(send, 502, {"detail": f"outpost gateway: {type(exc).__name__}: {exc}"})
            return None, 0, b""
        content = resp.content
        if resp.is_success:
            try:
                context = json.loads(content)
                context.update(next_method=resume.next_method, next_kwargs=resume.next_kwargs, xcom_keys_to_clear=[])
                if "start_date" in context:  # Execution API 2025-08+ (Task SDK 1.2): the try's first start, as on a resume
                    context["start_date"] = resume.run_body.get("start_date")
                content = json.dumps(context).encode()
            except (ValueError, AttributeError) as exc:
                await reply(send, 502, {"detail": f"outpost gateway: unreadable start answer ({exc})"})
                return None, len(resp.content), b""
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.multi_items()
               if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"]  # httpx decoded it
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})
        return resp.status_code, len(resp.content), content[:2048]

    async def start_confirmed(self, send: Any, url: str, headers: list[tuple[str, str]], body: bytes,
                               ti_id: str, settle_s: float) -> tuple[int | None, int, bytes]:
        """Forward a task start, then confirm this worker owns the try before the task may run.

        On a SQLite metadata DB the server can hand one job to several workers and accept each of
        their starts. The start recorded last (hostname, pid) owns the try; after ``settle_s`` a
        heartbeat with this start's identity tells whether that is us. If it is not, the task is
        answered 409 (as a refused start), so its code never runs here.
        """
        try:
            resp = await self._http.request("PATCH", url, headers=headers, content=body)
            if resp.is_success:
                await asyncio.sleep(settle_s)
                who = json.loads(body or b"{}")
                beat = json.dumps({"hostname": who.get("hostname"), "pid": who.get("pid")})
                auth = [(k, v) for k, v in headers if k.lower() == "authorization"]
                check = await self._http.request("PUT", url[: -len("/run")] + "/heartbeat", content=beat,
                                                 headers=[*auth, ("content-type", "application/json")])
                if check.status_code == 409:
                    self._on_start_refused(ti_id)
                    log.warning("task instance %s was handed to another worker too, which started it last; "
                                "not running it here", ti_id)
                    await reply(send, 409, {"detail": {
                        "reason": "invalid_state", "previous_state": "running",
                        "message": "outpost: this try was handed to another worker as well and runs there"}})
                    return 409, len(resp.content) + len(check.content), b""
        except httpx.HTTPError as exc:  # the Task SDK retries a 502
            await reply(send, 502, {"detail": f"outpost gateway: {type(exc).__name__}: {exc}"})
            return None, 0, b""
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.multi_items()
               if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"]  # httpx decoded it
        out.append((b"content-length", str(len(resp.content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        await send({"type": "http.response.body", "body": resp.content})
        return resp.status_code, len(resp.content), resp.content[:2048]

    async def forward(self, send: Any, method: str, url: str, headers: list[tuple[str, str]],
                       body: bytes) -> tuple[int | None, int, bytes]:
        """Send upstream and stream the answer back unchanged.

        Returns (status or None, bytes received, the first bytes of the answer for inspection).

        While the control plane is unreachable (transport errors, timeouts, 502/503/504) the request
        is held and retried (:class:`airflow_outpost.worker.egress.outage.Outage`) for up to ``outage_hold_s``, then
        answered 502. The Task SDK sends one request at a time per task, so holding keeps each
        task's requests in order. A heartbeat is answered 204 here while the upstream is down; the
        next one goes upstream, so a 404/409 (task no longer running) reaches the supervisor as is.
        """
        outage = self._outage
        heartbeat = outage.is_heartbeat(method, url)
        started, attempt = time.monotonic(), 0
        try:
            while True:
                timeout = outage.heartbeat_timeout_s if heartbeat else httpx.USE_CLIENT_DEFAULT
                request = self._http.build_request(method, url, headers=headers, content=body, timeout=timeout)
                response: httpx.Response | None = None
                try:
                    response = await self._http.send(request, stream=True)
                    failure = f"HTTP {response.status_code}" if response.status_code in OUTAGE_STATUSES else None
                except httpx.TransportError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                except httpx.HTTPError as exc:  # not an outage: retrying cannot help
                    log.warning("gateway: %s %s failed: %s", method, url, exc)
                    await reply(send, 502, {"detail": f"outpost gateway: {type(exc).__name__}: {exc}"})
                    return None, 0, b""
                if failure is None and response is not None:
                    outage.up()
                    break
                if response is not None:
                    await response.aclose()
                outage.down(failure or "no response")
                if heartbeat:  # the task is alive, which is all a heartbeat says; nothing left the worker
                    outage.local_heartbeats += 1
                    await send({"type": "http.response.start", "status": 204, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return None, 0, b""
                waited = time.monotonic() - started
                if waited >= outage.hold_s:
                    log.warning("gateway: gave up on %s %s after holding it %.0fs (%s)", method, url, waited, failure)
                    await reply(send, 502, {"detail": f"outpost gateway: control plane unreachable for {waited:.0f}s ({failure})"})
                    return None, 0, b""
                attempt += 1
                if attempt == 1:
                    outage.holding += 1
                    outage.held_total += 1
                await outage.wait(attempt, outage.hold_s - waited)
        finally:
            if attempt:
                outage.holding -= 1
        received = 0
        head = b""
        try:
            out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
                           if k.lower() not in HOP_BY_HOP or k.lower() == "content-length"]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in _raw(response):
                if len(head) < 2048:
                    head += chunk[:2048 - len(head)]
                received += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        return response.status_code, received, head



async def _raw(response: httpx.Response) -> Any:
    """The body as sent (still encoded); a response built in memory (tests' MockTransport) has it read."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.StreamConsumed:
        yield response.content


async def reply(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    # Exactly "application/json": the Task SDK only parses error bodies with that content type.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})

