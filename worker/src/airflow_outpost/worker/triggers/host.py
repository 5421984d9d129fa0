"""The worker's side of local triggers: the runner child, heartbeats for waiting tries, timeouts, limits.

:class:`LocalTriggers` is given a :class:`Deferral` per task that deferred on this worker and
returns a future of its :class:`WaitEnd`. Meanwhile it

* runs the trigger in the runner child (:mod:`airflow_outpost.worker.triggers.runner`), started
  on first use and restarted (with every waiting trigger sent again) if it dies;
* heartbeats the try every ``heartbeat_s`` (``heartbeat_interval_s``, kept within 30-60 s) through the
  egress gateway, with the hostname
  and pid of the try's first task process (the server checks both), and keeps the newest token
  the server hands out (``Refreshed-API-Token``). A 404/409 says the try is no longer running here
  (marked failed, cleared, or taken over): the trigger stops and the wait ends ``gone``;
* ends a wait past its ``trigger_timeout`` as Airflow's scheduler does (``__fail__`` with
  ``Trigger timeout``), and refuses a wait beyond ``max_local_triggers`` the same way, naming
  the limit.

Nothing here talks to the control plane but the heartbeats, and those carry no trigger data. The
triggers' own Task SDK requests (Variables, XComs, counts, ...) go from the runner child through
the egress gateway with the try's token; a token either side got refreshed is passed to the other.
``aclose()`` cancels every trigger (the waits end ``stopped``) and is safe twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

log = logging.getLogger(__name__)

# Waiting tries heartbeat every heartbeat_interval_s, kept between these: no more often than every
# 30 s (1.7 requests/s for 50 waiting tasks rather than 5), and at least every 60 s, well inside
# Airflow's default task_instance_heartbeat_timeout (300 s) and its token refresh window (the last
# 20% of a 600 s token, at least 30 s).
WAIT_HEARTBEAT_S, WAIT_HEARTBEAT_MAX_S = 30.0, 60.0
TICK_S = 0.5  # how often deadlines are checked
RESTART_BACKOFF_S = 2.0
MAX_RESTARTS, RESTART_WINDOW_S = 5, 120.0  # more deaths than this in the window: fail the waiting triggers
TRIGGER_TIMEOUT = "Trigger timeout"  # TriggerFailureReason.TRIGGER_TIMEOUT: the Task SDK raises TaskDeferralTimeout


def trigger_timeout_s(value: Any) -> float | None:
    """Seconds of a deferral's ``trigger_timeout`` as the Task SDK sends it (an ISO 8601 duration
    such as ``PT30S``, or seconds); None for none. Raises ``ValueError`` for anything else."""
    if value is None:
        return None
    import datetime as dt

    from pydantic import TypeAdapter, ValidationError

    try:
        return max(0.0, TypeAdapter(dt.timedelta).validate_python(value).total_seconds())
    except ValidationError as exc:
        raise ValueError(f"trigger_timeout {value!r} is not a duration") from exc


@dataclass
class Deferral:
    """A task try waiting on a local trigger: what resumes it, and what keeps it alive.

    Journaled with the job (the state folder's files are 0600): ``token`` is the try's newest
    Execution API token, without which it could not be resumed after a worker restart.
    """

    ti_id: str
    classpath: str
    trigger_kwargs: Any
    next_method: str
    next_kwargs: Any
    token: str
    run_body: dict[str, Any]  # the try's first start request: hostname, unixname, pid, start_date
    deadline: float | None = None  # epoch seconds (trigger_timeout), None: none
    log_file: str | None = None
    since: float = field(default_factory=time.time)

    @property
    def hostname(self) -> str:
        return str(self.run_body.get("hostname", ""))

    @property
    def pid(self) -> int:
        return int(self.run_body.get("pid") or 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_request(cls, ti_id: str, body: bytes, authorization: str, run_body: dict[str, Any],
                     log_file: Path) -> Deferral:
        """The deferral a task process sent (``PATCH .../state``, ``TIDeferredStatePayload``);
        ``ValueError`` naming what is wrong with it."""
        try:
            payload = json.loads(body)
            deferral = cls(ti_id=ti_id, classpath=str(payload["classpath"]), trigger_kwargs=payload.get("trigger_kwargs"),
                           next_method=str(payload["next_method"]), next_kwargs=payload.get("next_kwargs"),
                           token=authorization.split(" ", 1)[-1], run_body=run_body, log_file=str(log_file))
            timeout_s = trigger_timeout_s(payload.get("trigger_timeout"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a deferral: {type(exc).__name__}: {exc}") from exc
        if timeout_s is not None:
            deferral.deadline = time.time() + timeout_s
        return deferral

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Deferral:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class ResumeQueue:
    """Tries whose wait ended take their slot back first come, first served."""

    def __init__(self) -> None:
        self._queue: list[Any] = []

    async def take(self, key: Any, slots: int, concurrency: Callable[[], int], busy: Callable[[], int],
                   give_up: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> bool:
        """True once ``key`` is first in line and ``busy() + slots <= concurrency()``; False as soon
        as ``give_up()``. Cancel-safe."""
        self._queue.append(key)
        try:
            while not (self._queue[0] == key and busy() + slots <= concurrency()):
                if give_up():
                    return False
                await asyncio.sleep(poll_s)
            return not give_up()
        finally:
            self._queue.remove(key)


@dataclass(frozen=True)
class WaitEnd:
    """How a wait ended.

    * ``resume``: the trigger fired; resume with ``next_method`` and ``next_kwargs``;
    * ``fail``: resume with ``__fail__`` (the Task SDK raises ``TaskDeferralError`` or, for
      ``error == "Trigger timeout"``, ``TaskDeferralTimeout``, and the task fails or retries);
    * ``task_end``: the trigger ended the task itself (``TaskSuccessEvent`` and kin): ``state``, ``xcoms``;
    * ``gone``: the server no longer runs this try here (``error`` says why); nothing resumes;
    * ``stopped``: the worker stopped the wait (drain timeout, shutdown); nothing resumes.
    """

    kind: Literal["resume", "fail", "task_end", "gone", "stopped"]
    next_kwargs: Any = None
    state: str | None = None
    xcoms: dict[str, Any] | None = None
    error: str | None = None
    traceback: list[str] | None = None

    def fail_kwargs(self, like: Any = None) -> Any:
        """``next_kwargs`` of a ``__fail__`` resume, as Airflow's triggerer and scheduler write them,
        encoded like ``like`` (the deferral's own ``next_kwargs``): Task SDK 1.1 reads
        ``BaseSerialization`` (``{"__type": "dict", "__var": ...}``), later ones plain JSON."""
        kwargs = {"error": self.error or "Trigger failure", "traceback": self.traceback or [self.error or ""]}
        if isinstance(like, dict) and set(like) == {"__type", "__var"}:
            return {"__type": "dict", "__var": kwargs}
        return kwargs


@dataclass
class _Wait:
    deferral: Deferral
    ended: asyncio.Future[WaitEnd]
    next_beat: float = 0.0


class LocalTriggers:
    """Runs the triggers of tasks waiting on this worker. See the module docstring.

    ``gateway_url``: where heartbeats go (the egress gateway's Execution API URL);
    ``env``: the runner child's environment (the task environment, without worker credentials);
    ``on_token``: told ``(ti_id, token)`` when the server refreshed a waiting try's token.
    """

    def __init__(self, *, max_waiting: int, gateway_url: Callable[[], str | None], env: Callable[[], dict[str, str]],
                 stderr_path: Path, on_token: Callable[[str, str], None] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, heartbeat_s: float = WAIT_HEARTBEAT_S) -> None:
        self.max_waiting = max_waiting
        self._gateway_url = gateway_url
        self._env = env
        self._stderr_path = stderr_path
        self._on_token = on_token
        self._heartbeat_s = heartbeat_s
        self._http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30.0, connect=10.0))
        self._waits: dict[str, _Wait] = {}
        self._child: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._spawning: asyncio.Lock | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart_times: list[float] = []
        self._refusing = False
        self.ended: dict[str, int] = {}  # waits ended, by kind, for metrics and `outpost status`
        self.restarts = 0

    # -- what observers read -----------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waits)

    def describe(self) -> dict[str, Any]:
        now = time.time()
        return {"waiting": self.waiting, "max": self.max_waiting, "ended": dict(self.ended),
                "oldest_s": round(max((now - w.deferral.since for w in self._waits.values()), default=0.0), 1)}

    def is_waiting(self, ti_id: str) -> bool:
        return ti_id in self._waits

    # -- waits ---------------------------------------------------------------------------------
    def wait(self, deferral: Deferral, *, adopted: bool = False) -> asyncio.Future[WaitEnd]:
        """Start waiting on ``deferral``'s trigger; the future resolves once, with how the wait ended.

        ``adopted``: the wait was journaled by a previous worker process; its try is heartbeaten at
        once (its token may be close to expiry). Beyond ``max_waiting`` waits the future is already resolved ``fail`` (the task then fails
        with that message and Airflow's retries apply). Waiting again on a try that waits already
        returns its future.
        """
        loop = asyncio.get_running_loop()
        if (current := self._waits.get(deferral.ti_id)) is not None:
            return current.ended
        ended: asyncio.Future[WaitEnd] = loop.create_future()
        if self._closed or self._refusing:
            ended.set_result(WaitEnd("stopped", error="the worker is shutting down"))
            return ended
        if len(self._waits) >= self.max_waiting:
            message = (f"outpost: {len(self._waits)} tasks already wait on local triggers on this worker, its limit "
                       f"(max_local_triggers = {self.max_waiting}); raise --max-local-triggers or use --triggers central")
            log.error("task instance %s: %s", deferral.ti_id, message)
            self._count("fail")
            ended.set_result(WaitEnd("fail", error=message))
            return ended
        self._waits[deferral.ti_id] = _Wait(deferral, ended, next_beat=time.monotonic() + (0 if adopted else self._heartbeat_s))
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="local trigger heartbeats")
        self._background(self._submit(deferral))
        return ended

    def _background(self, coro: Any) -> None:
        """Run ``coro`` as a task the host holds (the loop keeps only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self, ti_id: str, end: WaitEnd) -> None:
        """End ``ti_id``'s wait as ``end`` (its trigger is cancelled). Safe if it does not wait."""
        wait = self._waits.pop(ti_id, None)
        if wait is None:
            return
        self._send({"op": "cancel", "id": ti_id})
        self._resolve(wait, end)

    def stop_all(self, reason: str, *, refuse_new: bool = False) -> int:
        """End every wait ``stopped`` with ``reason``; return how many there were. ``refuse_new``:
        later waits end ``stopped`` at once too (the worker is past its drain timeout)."""
        self._refusing = self._refusing or refuse_new
        ids = list(self._waits)
        for ti_id in ids:
            self.stop(ti_id, WaitEnd("stopped", error=reason))
        return len(ids)

    def _resolve(self, wait: _Wait, end: WaitEnd) -> None:
        if not wait.ended.done():
            self._count(end.kind)
            wait.ended.set_result(end)

    def _count(self, kind: str) -> None:
        self.ended[kind] = self.ended.get(kind, 0) + 1

    # -- the runner child ----------------------------------------------------------------------
    async def _submit(self, deferral: Deferral) -> None:
        try:
            await self._ensure_child()
        except OSError as exc:
            log.error("could not start the trigger runner: %s", exc)
            self.stop(deferral.ti_id, WaitEnd("fail", error=f"outpost: the worker could not start its trigger runner ({exc})"))
            return
        self._send(self._run_message(deferral))

    def _run_message(self, d: Deferral) -> dict[str, Any]:
        return {"op": "run", "id": d.ti_id, "classpath": d.classpath, "kwargs": d.trigger_kwargs,
                "next_method": d.next_method, "next_kwargs": d.next_kwargs, "log": d.log_file,
                "api": self._gateway_url(), "token": d.token}

    def _send(self, message: dict[str, Any]) -> None:
        child = self._child
        if child is None or child.stdin is None or child.returncode is not None:
            return  # sent again when the child (re)starts
        with contextlib.suppress(ConnectionError, RuntimeError):
            child.stdin.write((json.dumps(message, default=str) + "\n").encode())

    async def _ensure_child(self) -> None:
        if self._spawning is None:
            self._spawning = asyncio.Lock()
        async with self._spawning:
            if self._child is not None and self._child.returncode is None:
                return
            self._stderr_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._stderr_path, "ab") as err:
                self._child = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", "airflow_outpost.worker.triggers.runner", stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=err, env=self._env(), limit=64 * 1024 * 1024,
                    # Its own session: a signal to the worker's process group (Ctrl-C, a container
                    # stop) must not kill the triggers before the drain decides about them. It
                    # exits when the worker closes its stdin, or dies.
                    start_new_session=True)
            log.info("trigger runner started (pid %d)", self._child.pid)
            self._reader = asyncio.create_task(self._read(self._child), name="trigger runner reader")
            for wait in list(self._waits.values()):  # a restart: every waiting trigger starts again
                self._send(self._run_message(wait.deferral))

    async def _read(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("op") == "done":
                self._done(message)
            elif isinstance(message, dict) and message.get("op") == "token":
                self._refreshed(message.get("id"), message.get("token"), from_child=True)
        code = await child.wait()
        if self._closed:
            return
        self.restarts += 1
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S] + [now]
        if len(self._restart_times) > MAX_RESTARTS:
            # A trigger that kills its runner would otherwise take it down again at every restart.
            message = (f"outpost: the trigger runner died {len(self._restart_times)} times in {RESTART_WINDOW_S:.0f}s "
                       f"(exit {code}; its log: {self._stderr_path}); a trigger that kills its process fails these tasks")
            log.error("%s; failing the %d waiting trigger(s)", message, len(self._waits))
            for ti_id in list(self._waits):
                self.stop(ti_id, WaitEnd("fail", error=message))
            self._restart_times.clear()
            return
        log.error("the trigger runner exited with %s; restarting it with %d waiting trigger(s) (its log: %s)",
                  code, len(self._waits), self._stderr_path)
        await asyncio.sleep(RESTART_BACKOFF_S)
        if self._waits and not self._closed:
            with contextlib.suppress(OSError):
                await self._ensure_child()

    def _done(self, message: dict[str, Any]) -> None:
        ti_id = message.get("id")
        wait = self._waits.pop(ti_id, None) if isinstance(ti_id, str) else None
        if wait is None:
            return
        end = message.get("end")
        if end == "resume":
            self._resolve(wait, WaitEnd("resume", next_kwargs=message.get("next_kwargs")))
        elif end == "task_end":
            xcoms = message.get("xcoms")
            self._resolve(wait, WaitEnd("task_end", state=str(message.get("state")),
                                        xcoms=xcoms if isinstance(xcoms, dict) else None))
        else:
            tb = message.get("traceback")
            self._resolve(wait, WaitEnd("fail", error=str(message.get("error") or "Trigger failure"),
                                        traceback=[str(t) for t in tb] if isinstance(tb, list) else None))

    # -- deadlines and heartbeats ------------------------------------------------------------------
    async def _tick(self) -> None:
        while not self._closed:
            now_wall, now = time.time(), time.monotonic()
            for ti_id, wait in list(self._waits.items()):
                deadline = wait.deferral.deadline
                if deadline is not None and now_wall >= deadline:
                    log.warning("task instance %s: trigger timeout reached after %.0fs", ti_id, now_wall - wait.deferral.since)
                    self.stop(ti_id, WaitEnd("fail", error=TRIGGER_TIMEOUT))
                elif now >= wait.next_beat:
                    wait.next_beat = now + self._heartbeat_s
                    self._background(self._heartbeat(wait))
            await asyncio.sleep(TICK_S)

    async def heartbeat_now(self) -> None:
        """Heartbeat every waiting try now (tests, and a worker that was away)."""
        await asyncio.gather(*(self._heartbeat(w) for w in list(self._waits.values())))

    async def _heartbeat(self, wait: _Wait) -> None:
        d, base = wait.deferral, self._gateway_url()
        if base is None:
            return
        try:
            resp = await self._http.put(f"{base}task-instances/{d.ti_id}/heartbeat",
                                        json={"hostname": d.hostname, "pid": d.pid},
                                        headers={"Authorization": f"Bearer {d.token}"})
        except httpx.HTTPError as exc:  # the gateway holds outages itself; this is the worker's own loopback
            log.warning("heartbeat of waiting task instance %s failed: %s", d.ti_id, exc)
            return
        self._refreshed(d.ti_id, resp.headers.get("Refreshed-API-Token"))
        if resp.status_code in (401, 403, 404, 409, 410):
            detail = _detail(resp)
            if resp.status_code in (401, 403):
                detail = f"its token was refused ({detail}); it expired or the server's secret changed"
            log.warning("task instance %s is no longer running on this worker (HTTP %d: %s); stopping its trigger",
                        d.ti_id, resp.status_code, detail)
            if self._waits.get(d.ti_id) is wait:  # not a newer wait of the same try
                self.stop(d.ti_id, WaitEnd("gone", error=f"HTTP {resp.status_code}: {detail}"))

    def _refreshed(self, ti_id: Any, token: Any, *, from_child: bool = False) -> None:
        """The server handed out a newer token for a waiting try: keep it, journal it, and tell the
        side that did not see it (the runner child's requests, or the heartbeats)."""
        wait = self._waits.get(ti_id) if isinstance(ti_id, str) else None
        if wait is None or not isinstance(token, str) or not token or token == wait.deferral.token:
            return
        wait.deferral.token = token
        if self._on_token is not None:
            self._on_token(ti_id, token)
        if not from_child:
            self._send({"op": "token", "id": ti_id, "token": token})

    async def end_task(self, deferral: Deferral, key: Any, state: str, xcoms: dict[str, Any] | None) -> str | None:
        """Set the try's final state as a trigger's ``TaskSuccessEvent`` (and kin) asks, after its
        XComs, through the gateway with the try's token; the state, or None if the server refused."""
        import datetime as dt

        base = self._gateway_url()
        if base is None:
            return None
        auth = {"Authorization": f"Bearer {deferral.token}"}
        params = {"map_index": key.map_index} if key.map_index >= 0 else {}
        try:
            for name, value in (xcoms or {}).items():
                resp = await self._http.post(f"{base}xcoms/{key.dag_id}/{key.run_id}/{key.task_id}/{name}",
                                             params=params, json=value, headers=auth)
                if not resp.is_success:
                    log.error("task instance %s: XCom %r from its trigger was refused (HTTP %d: %s)", deferral.ti_id,
                              name, resp.status_code, _detail(resp))
                    state = "failed"
            body: dict[str, Any] = {"state": state, "end_date": dt.datetime.now(dt.UTC).isoformat()}
            if state == "success":
                body.update(task_outlets=[], outlet_events=[])
            resp = await self._http.patch(f"{base}task-instances/{deferral.ti_id}/state", json=body, headers=auth)
        except httpx.HTTPError as exc:
            log.error("task instance %s: could not set the state %s its trigger asked for: %s", deferral.ti_id, state, exc)
            return None
        if not resp.is_success:
            log.error("task instance %s: the server refused the state %s its trigger asked for (HTTP %d: %s)",
                      deferral.ti_id, state, resp.status_code, _detail(resp))
            return None
        return state

    async def aclose(self) -> None:
        """Cancel every trigger (waits end ``stopped``), stop the child. Safe twice."""
        self.stop_all("the worker stopped")
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            if child.stdin is not None:
                child.stdin.close()  # the runner cancels its triggers (cleanup runs) and exits
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
            self._reader = None
        await self._http.aclose()


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return resp.text[:200]
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("reason") or detail)
    return str(detail)
