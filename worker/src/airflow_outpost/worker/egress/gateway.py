"""The egress gateway: the one local chokepoint between task processes and the control plane.

Task processes get ``http://127.0.0.1:<port>/<secret>/execution/`` as their Execution API URL
(a random prefix per state folder, kept with the port in ``gateway.json``:
:mod:`airflow_outpost.worker.egress.gateway_file`; a request without it is refused 404). The
gateway, an ASGI app served by uvicorn inside the worker's event loop, forwards each request to
the real Execution API over one pooled ``httpx.AsyncClient`` (with the worker's TLS settings),
after the egress policy (:mod:`airflow_outpost.worker.egress.policy`) allowed it, and records it in the ledger
(:mod:`airflow_outpost.worker.egress.ledger`). Methods, headers (the task's ``Authorization`` token), bodies and status
codes pass unchanged, so a 404/409 from the server reaches the Task SDK as it expects. Only the
Execution API, and only for the tries this worker runs, is forwarded
(:mod:`airflow_outpost.worker.egress.admission`: the secret prefix, no dot segments, a task
token of a running try; refused 404/400/401/403 and ledgered, under ``/execution/``, never the
secret). A refused
request is answered with the refusal's status and ``{"detail": "<rule, kind, size>"}``, which the
Task SDK raises in the task (``ServerResponseError``), failing it with that message.

:class:`Egress` bundles policy, ledger and gateway for the worker: ``start()`` before the task
launcher, ``aclose()`` last; both idempotent. The worker's own Edge API calls are recorded through
:meth:`Egress.record_edge` (``EdgeClient.recorder``).

Talking to the upstream (outage holding, confirmed and resumed starts) is
:mod:`airflow_outpost.worker.egress.upstream`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import httpx
import uvicorn

from airflow_outpost.worker.config import WORKER_CREDENTIAL_ENV
from airflow_outpost.worker.edge.auth import control_plane_ssl
from airflow_outpost.worker.egress import admission
from airflow_outpost.worker.egress.admission import PREFIX, masked, new_prefix, public_path, token_subject
from airflow_outpost.worker.egress.gateway_file import GatewayRecord, listener_uid, read_record, save_record
from airflow_outpost.worker.egress.ledger import Entry, Ledger
from airflow_outpost.worker.egress.outage import Outage
from airflow_outpost.worker.egress.policy import Policy, Refusal, classify
from airflow_outpost.worker.egress.upstream import HOP_BY_HOP, Resume, Upstream, reply, running_elsewhere
from airflow_outpost.worker.triggers.comms import TRIGGER_HEADER

__all__ = ["PREFIX", "Egress", "Gateway", "GatewayRecord", "Resume"]

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.jobs import Job
    from airflow_outpost.worker.egress.redact import LogRedactor

log = logging.getLogger(__name__)

_TI_RUN = re.compile(r"^task-instances/([^/]+)/run$")
_TI_HEARTBEAT = re.compile(r"^task-instances/([^/]+)/heartbeat$")
_TI_STATE = re.compile(r"^task-instances/([^/]+)/state$")
_TRIGGER_HEADER = TRIGGER_HEADER.lower()
MAX_TASK_LABELS = 10_000  # ti id -> "dag.task run=.. try=.." for ledger rows; far more than run at once


def _edge_task_label(rel: str) -> str | None:
    """``dag.task[map] run=... try=...`` (as ``JobKey`` prints) for Edge job-state and log-push paths."""
    parts = [unquote(p) for p in rel.split("/")]
    if len(parts) >= 7 and parts[:2] in (["jobs", "state"], ["logs", "push"]):
        dag_id, task_id, run_id, try_number, map_index = parts[2:7]
        mi = f"[{map_index}]" if map_index.lstrip("-").isdigit() and int(map_index) >= 0 else ""
        return f"{dag_id}.{task_id}{mi} run={run_id} try={try_number}"
    return None


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: the CLI owns signals (it installs them once)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    """Loopback HTTP server forwarding ``<prefix>*`` to the control plane's ``/execution/*``.
    ``aclose()`` is safe twice."""

    def __init__(self, egress: Egress, upstream: str, *, client: httpx.AsyncClient) -> None:
        self._egress = egress
        self._upstream = upstream if upstream.endswith("/") else upstream + "/"
        self._outage = Outage(egress.settings.outage_hold_s)
        self._outage.on_up = lambda: egress.on_upstream_back() if egress.on_upstream_back is not None else None
        self._to = Upstream(client, self._outage, egress.mark_start_refused)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url: str | None = None
        self.prefix = new_prefix()  # replaced by start(); a request must begin with it

    def retry_held(self) -> None:
        """Let requests held through an outage retry now instead of after their backoff."""
        self._outage.nudge()

    async def start(self, host: str = "127.0.0.1", port: int = 0, prefix: str | None = None) -> str:
        """Bind ``port`` (0: a free one) on loopback, serve under ``prefix`` (``None``: a new
        secret one), and return the Execution API URL for task processes. Raises ``OSError`` if
        ``port`` is taken. Idempotent once started."""
        if self.url is not None:
            return self.url
        self.prefix = prefix or new_prefix()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR: a restarted worker rebinds its previous port although connections of the
        # dead process linger in TIME_WAIT (it still fails while anything listens there).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it Nagle holds an answer's body behind its
        # headers until the client's delayed ACK, about 45 ms on some of a task's requests.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(self, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_keep_alive=60, timeout_graceful_shutdown=5)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="egress gateway")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
                raise RuntimeError("egress gateway stopped during start-up")
            await asyncio.sleep(0.01)
        self.url = f"http://{host}:{sock.getsockname()[1]}{self.prefix}"
        log.info("egress gateway for task processes on %s -> %s", masked(self.url), self._upstream)
        return self.url

    async def aclose(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        self._server = self._task = None

    async def _read_body(self, receive: Any, send: Any, headers: list[tuple[str, str]], kind: str, method: str,
                         path: str, task: str | None) -> bytearray | None:
        """The request's body, read no further than its kind's cap; ``None`` once refused (413,
        ledgered) or disconnected. A ``Content-Length`` over the cap is refused before any of the
        body is read; a body without one (chunked) is read up to the cap and refused there."""
        policy = self._egress.policy
        declared = next((v for k, v in headers if k.lower() == "content-length"), None)
        refusal = None
        if declared is not None and declared.strip().isdigit():
            refusal = policy.over_cap(kind, method, path, int(declared), said="announces")
        body = bytearray()
        if refusal is None:
            _, limit = policy.cap_for(kind, method)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > limit:
                    refusal = policy.over_cap(kind, method, path, len(body), said="runs past")
                    break
                if not message.get("more_body"):
                    return body
        assert refusal is not None
        # What is left of the body is not read into memory: uvicorn discards it as it arrives, so
        # the connection stays usable and the client, which sends its whole body before it reads,
        # gets this answer instead of a reset.
        self._egress.refused(refusal, task, PREFIX + path, method, None)
        await reply(send, refusal.status, {"detail": refusal.message})
        return None

    # -- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        method = scope["method"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        auth = next((v for k, v in headers if k.lower() == "authorization"), None)
        subject = token_subject(auth)
        task = self._egress.task_label(subject)
        if any(k.lower() == _TRIGGER_HEADER for k, _ in headers):  # a local trigger's Task SDK request
            headers = [(k, v) for k, v in headers if k.lower() != _TRIGGER_HEADER]
            task = f"{task or '?'} via trigger"
        # Before the body is read: a caller that may not use the gateway cannot make it buffer one.
        prefix = self.prefix
        if (refusal := admission.check(raw_path, method, auth, self._egress.running, prefix=prefix)) is not None:
            # Ledgered under /execution/: the ledger never holds the secret part.
            endpoint = public_path(raw_path, prefix) if refusal.status in (400, 404) else PREFIX + unquote(raw_path[len(prefix):])
            if refusal.status not in (400, 404):
                refusal = dataclasses.replace(refusal, kind=classify(unquote(raw_path[len(prefix):]), method))
            self._egress.refused(refusal, task, endpoint, method, None)
            await reply(send, refusal.status, {"detail": refusal.message})
            return
        if subject is not None and auth is not None:  # always, once admitted: a running try's own token
            self._egress.note_token(subject, auth)
        rest = raw_path[len(prefix):]
        path = unquote(rest)
        kind = classify(path, method)
        body = await self._read_body(receive, send, headers, kind, method, path, task)
        if body is None:
            return
        if method == "PATCH" and (st := _TI_STATE.match(path)) and self._egress.keep_deferral(st.group(1), bytes(body), auth):
            # Local triggers: the deferral (trigger class path and kwargs) stays on this worker.
            self._egress.ledger.record(Entry(ts=time.time(), task=task, endpoint=PREFIX + path, method=method, kind=kind,
                                             bytes=len(body), status=204, outcome="kept", rule="local trigger",
                                             digest=hashlib.sha256(body).hexdigest()))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        refusal = self._egress.policy.check(kind, method, path, len(body))
        digest = hashlib.sha256(body).hexdigest() if body else None
        endpoint = PREFIX + path
        if refusal is not None:
            self._egress.refused(refusal, task, endpoint, method, digest)
            body_out = {"message": refusal.message} if refusal.keep_local else {"detail": refusal.message}
            await reply(send, refusal.status, body_out)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        url = self._upstream + rest + (f"?{query}" if query else "")
        fwd_headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        confirm = self._egress.settings.confirm_start_s
        run = _TI_RUN.match(path) if method == "PATCH" else None
        beat = _TI_HEARTBEAT.match(path) if method == "PUT" else None
        try_path = run or beat
        resume = self._egress.resume_of(try_path.group(1)) if try_path is not None else None
        if resume is not None and beat is not None:
            # A resumed try's new task process heartbeats as the try's first one (the server checks the pid).
            body = bytearray(json.dumps({"hostname": resume.run_body.get("hostname"), "pid": resume.run_body.get("pid")}).encode())
        if resume is not None and run is not None:
            status, bytes_in, head = await self._to.resume_start(send, url, fwd_headers, resume)
        elif confirm and run is not None:
            status, bytes_in, head = await self._to.start_confirmed(send, url, fwd_headers, bytes(body), run.group(1), confirm)
        else:
            status, bytes_in, head = await self._to.forward(send, method, url, fwd_headers, bytes(body))
        if status == 409 and resume is None and (ti_id := running_elsewhere(method, path, head)):
            self._egress.mark_start_refused(ti_id)
        elif run is not None and resume is None and status is not None and 200 <= status < 300:
            self._egress.remember_start(run.group(1), bytes(body))
        elif status is not None and 200 <= status < 300 and method == "PATCH" and (st := _TI_STATE.match(path)):
            self._egress.note_task_state(st.group(1), bytes(body))
        self._egress.ledger.record(Entry(
            ts=time.time(), task=task, endpoint=endpoint, method=method, kind=kind, bytes=len(body),
            bytes_in=bytes_in, status=status, outcome="sent" if status else "error", digest=digest))


class Egress:
    """Policy + ledger + gateway of one worker. ``start()``/``aclose()`` are idempotent."""

    def __init__(self, settings: Settings, *, upstream_transport: httpx.AsyncBaseTransport | None = None,
                 on_start_refused: Callable[[str], None] | None = None,
                 on_upstream_back: Callable[[], None] | None = None,
                 on_task_state: Callable[[str, str], None] | None = None,
                 on_deferral: Callable[[str, bytes, str | None], bool] | None = None) -> None:
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        self.ledger = Ledger(settings.state_folder / "egress.sqlite")
        self._tasks: dict[str, str] = {}
        # Token subjects of the tries and callbacks running now: only their tokens may use the gateway.
        self._running: set[str] = set()
        # Task instances whose start the server refused (409 on .../run): already running elsewhere.
        self.start_refused: set[str] = set()
        # Told each newly refused task instance id, so the job journal can keep it across a crash.
        self.on_start_refused = on_start_refused
        # Told when a held task request found the control plane back (the worker then probes at once).
        self.on_upstream_back = on_upstream_back
        # Told (ti_id, state) for each state change of a task the server accepted (the job runner
        # reports the task's real final state, not the supervisor's exit code).
        self.on_task_state = on_task_state
        # Local triggers: told (ti_id, body, authorization) of a task's deferral; True if the
        # worker keeps it (the gateway then answers it and forwards nothing).
        self.on_deferral = on_deferral
        self._starts: dict[str, dict[str, Any]] = {}  # ti id -> its try's first start request
        # Token subject -> the newest Authorization its task process sent (memory only, never
        # written): what the worker asks the control plane with when a try's own state is unknown.
        self._tokens: dict[str, str] = {}
        self._resumes: dict[str, Resume] = {}
        # After start(): whether the address a previous run recorded was served again (None: none
        # recorded), and if not, why (said in recovery's reasons for stopping adopted processes).
        self.port_kept: bool | None = None
        self.gateway_moved: str | None = None
        self._client = httpx.AsyncClient(
            verify=control_plane_ssl(settings), transport=upstream_transport,
            timeout=httpx.Timeout(settings.request_timeout_s, connect=min(10.0, settings.request_timeout_s)),
            limits=httpx.Limits(max_connections=max(8, settings.concurrency * 2), max_keepalive_connections=8),
        )
        self.gateway = Gateway(self, settings.execution_api, client=self._client)

    @property
    def url(self) -> str | None:
        return self.gateway.url

    @functools.cached_property
    def redactor(self) -> LogRedactor:
        """Masks and caps task logs for ``logs = "redacted"`` (built on first use)."""
        # Imported here: Airflow's secrets masker initialises Airflow's configuration and
        # logging on import, which only a worker that redacts logs should pay for.
        from airflow_outpost.worker.egress.redact import LogRedactor

        return LogRedactor(self.settings.redact_patterns, self.settings.redacted_log_max_bytes)

    async def start(self) -> str:
        """Start the ledger and the gateway; return the gateway's URL. Idempotent.

        The gateway serves on the port and under the prefix that an earlier run on this state
        folder recorded (:mod:`airflow_outpost.worker.egress.gateway_file`), if the record may be
        trusted and the port bound again: task processes that outlived that run (``crash_policy =
        adopt``) were given that URL. Otherwise it serves on a free port under a fresh prefix,
        :attr:`port_kept` is False and :attr:`gateway_moved` says why: those processes cannot
        reach the control plane through this run, and recovery stops them and reports them
        failed. Another user listening on the recorded port (it would receive their tokens) is an
        error naming the port and the uid. The address served is recorded for the next run.
        """
        self.ledger.start()
        if self.gateway.url is not None:
            return self.gateway.url
        folder = self.settings.state_folder
        previous, distrust = read_record(folder)
        if distrust is not None:
            self.port_kept = False
            self.gateway_moved = f"the recorded gateway address was not trusted: {distrust}"
            log.error("not trusting the egress gateway's recorded address: %s; serving on a new port under a new "
                      "prefix: task processes left running by the previous run are stopped and reported failed",
                      distrust)
        url: str | None = None
        if previous is not None:
            try:
                url = await self.gateway.start(port=previous.port, prefix=previous.prefix)
                self.port_kept = True
            except OSError as exc:
                self.port_kept = False
                self.gateway_moved = self._port_lost(previous.port, exc)
        if url is None:  # a new prefix too: the old one may have reached whoever holds the old port
            url = await self.gateway.start()
        assert self.port is not None
        save_record(folder, GatewayRecord(self.port, self.gateway.prefix))
        return url

    @staticmethod
    def _port_lost(port: int, exc: OSError) -> str:
        """Say (log) why the recorded ``port`` could not be bound again; return it for recovery."""
        holder = listener_uid(port)
        if holder is not None and holder != os.getuid():
            log.error("the egress gateway's previous port %d is held by uid %d, another user: task processes left "
                      "running by the previous run would send their task tokens to it. They are stopped and reported "
                      "failed; this run serves on a new port under a new prefix", port, holder)
            return f"its port {port} is held by uid {holder}, another user"
        log.warning("could not bind the egress gateway's previous port %d again (%s); using another one: task "
                    "processes left running by the previous run cannot reach the control plane through it",
                    port, exc)
        return f"the previous port {port} could not be bound again"

    @property
    def port(self) -> int | None:
        return urlsplit(self.url).port if self.url else None

    def control_plane_back(self) -> None:
        """The worker reached the control plane again: retry held task requests now."""
        self.gateway.retry_held()

    def mark_start_refused(self, ti_id: str) -> None:
        """The server refused to start ``ti_id`` here (it runs elsewhere): remember it, and tell
        :attr:`on_start_refused`, which must not raise."""
        if ti_id not in self.start_refused:
            self.start_refused.add(ti_id)
            if self.on_start_refused is not None:
                self.on_start_refused(ti_id)

    def note_task_state(self, ti_id: str, body: bytes) -> None:
        """The server accepted a task's state change (the body its task process sent): tell
        :attr:`on_task_state`. A body without a string ``state`` is ignored; an error in the
        callback is logged, so the request it answers is still ledgered."""
        try:
            state = json.loads(body or b"{}").get("state")
        except (ValueError, AttributeError):
            return
        if isinstance(state, str) and self.on_task_state is not None:
            try:
                self.on_task_state(ti_id, state)
            except Exception:
                log.exception("could not note the state %s of task instance %s", state, ti_id)

    # -- local triggers ------------------------------------------------------------------------
    def remember_start(self, ti_id: str, body: bytes) -> None:
        """Keep a try's accepted start request (with local triggers: a resume replays it)."""
        if self.settings.triggers != "local":
            return
        try:
            start = json.loads(body or b"{}")
        except ValueError:
            return
        if isinstance(start, dict):
            self._starts[ti_id] = start
            while len(self._starts) > MAX_TASK_LABELS:
                self._starts.pop(next(iter(self._starts)))

    def start_of(self, ti_id: str) -> dict[str, Any] | None:
        return self._starts.get(ti_id)

    def keep_deferral(self, ti_id: str, body: bytes, auth: str | None) -> bool:
        """True if this state change is a deferral the worker keeps (``triggers = local``)."""
        if self.settings.triggers != "local" or self.on_deferral is None or b'"deferred"' not in body:
            return False
        try:
            state = json.loads(body).get("state")
        except (ValueError, AttributeError):
            return False
        # The gateway admitted only the try's own token for its state; checked again here because
        # a kept deferral is acted on by this worker alone (the server never sees it).
        if state != "deferred" or token_subject(auth) != ti_id or not self.on_deferral(ti_id, body, auth):
            return False
        self.note_task_state(ti_id, body)
        return True

    def expect_resume(self, ti_id: str, resume: Resume) -> None:
        """The next task process of ``ti_id`` resumes it (see :meth:`Gateway._resume_start`)."""
        self._resumes[ti_id] = resume
        self._starts.setdefault(ti_id, resume.run_body)

    def resume_of(self, ti_id: str) -> Resume | None:
        return self._resumes.get(ti_id)

    def forget_try(self, subject: str) -> None:
        """The job of ``subject`` (a task instance or callback id) ended: its token no longer
        passes the gateway, and what the gateway kept for its resumes is dropped."""
        self._running.discard(subject)
        self._resumes.pop(subject, None)
        self._starts.pop(subject, None)
        self._tokens.pop(subject, None)

    def note_token(self, subject: str, authorization: str) -> None:
        """Keep the newest token a running try's task process sent (see :meth:`ask_try_state`)."""
        if subject in self._running:
            self._tokens[subject] = authorization

    async def ask_try_state(self, ti_id: str, dag_id: str, run_id: str, task_id: str, map_index: int) -> str | None:
        """The state the control plane holds for task instance ``ti_id`` (``GET
        /execution/task-instances/states``, with the newest token its task process sent through
        the gateway), or ``None`` when it cannot be asked: no token was seen (the process ended
        while no worker ran), or the request failed. Never raises.

        The answer is the task instance's state now: once Airflow retried the task it is the
        newer try's (``scheduled``, ``queued``, ``running``, ...), which a caller asking about an
        older try reads as "not a final state of this try".
        """
        auth = self._tokens.get(ti_id)
        if auth is None:
            return None
        base = self.settings.execution_api if self.settings.execution_api.endswith("/") else self.settings.execution_api + "/"
        params: dict[str, Any] = {"dag_id": dag_id, "run_ids": [run_id], "task_ids": [task_id], "map_index": map_index}
        status: int | None = None
        try:
            resp = await self._client.get(base + "task-instances/states", params=params,
                                          headers={"Authorization": auth})
            status = resp.status_code
            resp.raise_for_status()
            states = resp.json()["task_states"][run_id]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not ask the control plane for the state of task instance %s: %s", ti_id, exc)
            return None
        finally:  # the worker's own Execution API request: ledgered like its Edge API ones
            self.ledger.record(Entry(ts=time.time(), task=self.task_label(ti_id), endpoint=PREFIX + "task-instances/states",
                                     method="GET", kind=classify("task-instances/states", "GET"), bytes=0,
                                     status=status, outcome="sent" if status else "error"))
        state = states.get(task_id if map_index < 0 else f"{task_id}_{map_index}") if isinstance(states, dict) else None
        return state if isinstance(state, str) else None

    async def aclose(self) -> None:
        await self.gateway.aclose()
        await self._client.aclose()
        self.ledger.close()

    def apply_task_env(self, env: dict[str, str]) -> None:
        """Set the region and XCom backend for task processes; drop the worker's own credentials."""
        s = self.settings
        for name in WORKER_CREDENTIAL_ENV:
            env.pop(name, None)
        env.update({"OUTPOST_REGION": s.region, "OUTPOST_STORE_ROOT": str(s.region_store.resolve()),
                    "OUTPOST_XCOM_THRESHOLD_BYTES": str(s.xcom_threshold_bytes)})
        if s.region_local_xcom:
            env["AIRFLOW__CORE__XCOM_BACKEND"] = "airflow_outpost.worker.egress.xcom_backend.RegionLocalXCom"

    def task_server(self, job: Job) -> str:
        """Register ``job`` (its token may use the gateway until :meth:`forget_try`, and ledger rows
        name it) and return the URL its task process must use."""
        self.admit(job.subject, str(job.key))  # a token's subject: the task instance, or the callback
        return self.url or self.settings.execution_api

    def admit(self, subject: str, label: str) -> None:
        """Let tokens whose subject is ``subject`` use the gateway; ledger rows call it ``label``."""
        self._running.add(subject)
        self._tasks[subject] = label
        while len(self._tasks) > MAX_TASK_LABELS:  # oldest first (dicts keep insertion order)
            self._tasks.pop(next(iter(self._tasks)))

    @property
    def running(self) -> frozenset[str]:
        """The token subjects that may use the gateway now."""
        return frozenset(self._running)

    def task_label(self, ti_id: str | None) -> str | None:
        return self._tasks.get(ti_id, ti_id) if ti_id else None

    def refused(self, refusal: Refusal, task: str | None, endpoint: str, method: str, digest: str | None) -> None:
        if refusal.keep_local:
            log.debug("kept in region for %s: %s %s (%s)", task or "worker", method, endpoint, refusal.rule)
        else:
            log.warning("egress refused for %s: %s %s (%s)", task or "worker", method, endpoint, refusal.message)
        self.ledger.record(Entry(ts=time.time(), task=task, endpoint=endpoint, method=method, kind=refusal.kind,
                                 bytes=refusal.size, status=refusal.status,
                                 outcome="kept" if refusal.keep_local else "refused", rule=refusal.rule, digest=digest))

    def record_edge(self, method: str, path: str, body: bytes | None, status: int | None, bytes_in: int,
                    task: str | None = None) -> None:
        """Record one Edge API request of the worker itself (``status=None``: it never got an answer)."""
        rel = path.split("/edge_worker/v1/", 1)[-1]
        task = task or _edge_task_label(rel)
        self.ledger.record(Entry(
            ts=time.time(), task=task, endpoint=path, method=method, kind=classify(rel, method) if rel != path else "api",
            bytes=len(body or b""), bytes_in=bytes_in, status=status, outcome="sent" if status else "error",
            digest=hashlib.sha256(body).hexdigest() if body else None))

    def record_rejected_job(self, reason: str, task: str | None, size: int = 0) -> None:
        """Record an incoming job the worker refused (hostile or malformed)."""
        self.ledger.record(Entry(ts=time.time(), task=task, endpoint="/edge_worker/v1/jobs/fetch", method="POST",
                                 kind="job-rejected", bytes=0, bytes_in=size, outcome="rejected", rule=reason[:300]))
