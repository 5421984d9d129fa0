"""The Task SDK's comms for local triggers: what Airflow's triggerer supervisor answers, answered here.

A trigger's Task SDK calls (``Variable.get``, ``BaseHook.get_connection``, XCom,
``RuntimeTaskInstance.get_ti_count`` / ``get_task_states`` / ``get_dr_count`` /
``get_dagrun_state``, HITL, asset state store) go to ``task_runner.SUPERVISOR_COMMS``.
:class:`TriggerComms` is that object in the trigger runner: it answers each request type Airflow's
``TriggerRunnerSupervisor._handle_request`` answers (:data:`TRIGGER_REQUESTS`) with the installed
Task SDK's own request handlers (``airflow.sdk.execution_time.request_handlers``) and its
Execution API ``Client``, authenticated with the **waiting try's own token** and sent to the
worker's **egress gateway**, so the secrets policy, egress caps and the ledger apply as for tasks
(the gateway labels these rows ``... via trigger``). Local secrets backends answer Variables and
Connections first: the Task SDK asks them before it asks comms.

Which try asks is a context variable, set per trigger (:meth:`TriggerComms.caller`); asgiref's
``sync_to_async`` threads and greenback portals carry it. A request type the installed Task SDK
has no handler for, or one Airflow's triggerer does not answer either, raises
:class:`UnsupportedRequest` in that trigger only (it fails, with that message).

Tokens: the server refreshes a token on any request in its last fifth; the ``Client`` keeps the new
one and :meth:`TriggerComms.answer` reports it (``on_token``) so the worker journals it. The worker's
own heartbeats may refresh it too: :meth:`TriggerComms.set_token` gives the client that one.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("airflow_outpost.trigger")

# Request type -> the request handler (``request_handlers.<name>(client, msg)``) Airflow's triggerer
# uses for it. HITL and MaskSecret are answered apart (as in ``_handle_request``).
TRIGGER_REQUESTS: dict[str, str] = {
    "GetConnection": "handle_get_connection",
    "GetVariable": "handle_get_variable",
    "GetVariableKeys": "handle_get_variable_keys",
    "PutVariable": "handle_put_variable",
    "DeleteVariable": "handle_delete_variable",
    "GetXCom": "handle_get_xcom",
    "SetXCom": "handle_set_xcom",
    "DeleteXCom": "handle_delete_xcom",
    "GetTICount": "handle_get_ti_count",
    "GetTaskStates": "handle_get_task_states",
    "GetPreviousTI": "handle_get_previous_ti",
    "GetDRCount": "handle_get_dr_count",
    "GetDagRunState": "handle_get_dag_run_state",
    "GetAssetStateStoreByName": "handle_get_asset_state_store_by_name",
    "GetAssetStateStoreByUri": "handle_get_asset_state_store_by_uri",
    "SetAssetStateStoreByName": "handle_set_asset_state_store_by_name",
    "SetAssetStateStoreByUri": "handle_set_asset_state_store_by_uri",
    "DeleteAssetStateStoreByName": "handle_delete_asset_state_store_by_name",
    "DeleteAssetStateStoreByUri": "handle_delete_asset_state_store_by_uri",
    "ClearAssetStateStoreByName": "handle_clear_asset_state_store_by_name",
    "ClearAssetStateStoreByUri": "handle_clear_asset_state_store_by_uri",
}
_OTHER_REQUESTS = ("MaskSecret", "GetHITLDetailResponse", "UpdateHITLDetail")  # need Task SDK 1.3 too
TRIGGER_HEADER = "X-Outpost-Trigger"  # the gateway labels the ledger row "via trigger" and drops the header
_POLICY_PREFIX = "outpost egress policy"


class UnsupportedRequest(RuntimeError):
    """A trigger sent a Task SDK request the trigger runner cannot answer; fails that trigger."""


def sdk_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-airflow-task-sdk")
    except Exception:  # a source checkout without metadata
        return "unknown"


@dataclass
class Caller:
    """One waiting try as the control plane knows it: its id and its Execution API client."""

    ti_id: str
    client: Any  # airflow.sdk.api.client.Client
    token: str
    refusal: threading.local = field(default_factory=threading.local)
    unanswered: str | None = None  # the last UnsupportedRequest's message: a Task SDK may swallow the error


class TriggerComms:
    """``SUPERVISOR_COMMS`` of the trigger runner. ``send`` (any thread) and ``asend`` (the loop)."""

    def __init__(self, *, on_token: Callable[[str, str], None]) -> None:
        self._on_token = on_token
        self._callers: dict[str, Caller] = {}
        self._current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("outpost_trigger_caller",
                                                                                     default=None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._handlers = _load_handlers()
        self._masking = threading.local()  # set while this thread registers a secret (see _mask)

    # -- which try asks --------------------------------------------------------------------------
    def caller(self, ti_id: str, api_url: str | None, token: str | None) -> None:
        """Make ``ti_id`` the caller of the current context (call it in the trigger's own task)."""
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        if not api_url or not token:
            self._current.set(None)
            return
        from airflow.sdk.api.client import Client

        client = Client(base_url=api_url, token=token)
        client.headers[TRIGGER_HEADER] = "1"
        caller = Caller(ti_id=ti_id, client=client, token=token)
        # Before the Client's own hooks: its raise_on_4xx_5xx would raise before this one saw the answer.
        client.event_hooks["response"].insert(0, lambda resp: _note_refusal(caller, resp))
        self._callers[ti_id] = caller
        self._current.set(caller)

    def unanswered(self, ti_id: str) -> str | None:
        """Why the last request of ``ti_id``'s trigger that could not be answered was not (or None)."""
        caller = self._callers.get(ti_id)
        return caller.unanswered if caller is not None else None

    def forget(self, ti_id: str) -> None:
        caller = self._callers.pop(ti_id, None)
        if caller is not None:
            caller.client.close()

    def set_token(self, ti_id: str, token: str) -> None:
        """The worker holds a newer token for ``ti_id`` (its heartbeat was answered with one)."""
        from airflow.sdk.api.client import BearerAuth

        caller = self._callers.get(ti_id)
        if caller is not None and token != caller.token:
            caller.token = token
            caller.client.auth = BearerAuth(token)

    # -- SUPERVISOR_COMMS ------------------------------------------------------------------------
    def send(self, msg: Any) -> Any:
        """Answer ``msg`` for the calling trigger, blocking. On the loop's own thread (a sync SDK
        call in ``async def run``) it needs a greenback portal, as in Airflow's triggerer."""
        if type(msg).__name__ == "MaskSecret":
            return self._mask(msg)
        caller = self._caller(msg)
        if threading.get_ident() == self._loop_thread:
            import greenback

            if not greenback.has_portal():
                raise UnsupportedRequest(
                    "Sync SDK methods (e.g. get_connection(), get_variable()) cannot be called from a trigger's async "
                    "def run() when AIRFLOW_DISABLE_GREENBACK_PORTAL is set; use the async ones (aget_connection()...)")
            return greenback.await_(asyncio.to_thread(self.answer, caller, msg))
        return self.answer(caller, msg)

    async def asend(self, msg: Any) -> Any:
        if type(msg).__name__ == "MaskSecret":
            return self._mask(msg)
        caller = self._caller(msg)
        return await asyncio.to_thread(self.answer, caller, msg)

    def _mask(self, msg: Any) -> None:
        """``MaskSecret``: register the value with this process's secrets masker, the one that
        redacts what triggers log. No try's token is needed and nothing leaves the process.

        Airflow's triggerer answers it with ``handle_mask_secret`` in its supervisor, another
        process. Here that handler's ``mask_secret`` sends ``MaskSecret`` to ``SUPERVISOR_COMMS``
        again, which is this object: the nested send is dropped, or every masked answer (a
        Variable, a Connection's password) recursed until ``RecursionError``, which ``mask_secret``
        swallows together with whatever ran at that depth (the report of a refreshed token)."""
        if getattr(self._masking, "active", False):
            return None
        self._masking.active = True
        try:
            from airflow.sdk.execution_time.request_handlers import handle_mask_secret

            handle_mask_secret(msg)
        except ImportError:  # a Task SDK without request_handlers: mask_secret registered it already
            pass
        finally:
            self._masking.active = False
        return None

    def _caller(self, msg: Any) -> Caller:
        caller = self._current.get()
        if caller is None:
            raise UnsupportedRequest(f"outpost: {type(msg).__name__} was sent outside a trigger's own task (a thread "
                                     "or loop that does not carry its context), so no try's token can answer it")
        return caller

    # -- answering ------------------------------------------------------------------------------
    def answer(self, caller: Caller, msg: Any) -> Any:
        """The response the Task SDK expects for ``msg``; raises ``AirflowRuntimeError`` for an
        error from the server (as the supervisor's error frame does), :class:`UnsupportedRequest`
        for a type not answered here. Blocking: run it off the loop."""
        from airflow.sdk.api.client import ServerResponseError
        from airflow.sdk.exceptions import AirflowRuntimeError, ErrorType
        from airflow.sdk.execution_time.comms import ErrorResponse

        kind = type(msg).__name__
        caller.refusal.message = None
        try:
            resp = self._dispatch(caller, kind, msg)
        except UnsupportedRequest:
            raise
        except ServerResponseError as exc:
            detail = _json_or_none(exc.response)
            log.error("%s for task instance %s: the control plane answered HTTP %d: %s", kind, caller.ti_id,
                      exc.response.status_code, exc)
            raise AirflowRuntimeError(ErrorResponse(error=ErrorType.API_SERVER_ERROR, detail={
                "status_code": exc.response.status_code, "message": str(exc), "detail": detail})) from exc
        except Exception as exc:  # transport errors: the same error frame Airflow's supervisor sends
            log.exception("%s for task instance %s failed", kind, caller.ti_id)
            raise AirflowRuntimeError(ErrorResponse(error=ErrorType.API_SERVER_ERROR, detail={
                "status_code": None, "message": str(exc), "exception_type": type(exc).__name__})) from exc
        finally:
            self._note_token(caller)
        if (refused := getattr(caller.refusal, "message", None)) is not None:
            # The Task SDK turns a 403 into PERMISSION_DENIED without the reason: the task log gets it.
            log.error("%s", refused)
            if isinstance(resp, ErrorResponse):
                resp = resp.model_copy(update={"detail": {**(resp.detail or {}), "message": refused}})
        return resp

    def _dispatch(self, caller: Caller, kind: str, msg: Any) -> Any:
        if kind not in self.answered():
            known = kind in TRIGGER_REQUESTS or kind in _OTHER_REQUESTS
            message = (f"outpost: the trigger sent the Task SDK request {kind}, which "
                       + (f"this worker's Task SDK {sdk_version()} has no handler for" if known
                          else "Airflow's triggerer does not answer for triggers either")
                       + f"; local triggers answer {', '.join(sorted(self.answered())) or 'none with this Task SDK'}")
            # Logged (the task log) and kept: Task SDK 1.1/1.2's secrets backend turns any error of a
            # Variable or Connection request into "not found", which would hide this reason.
            log.error("%s", message)
            caller.unanswered = message
            raise UnsupportedRequest(message)
        if kind == "GetHITLDetailResponse":
            return caller.client.hitl.get_detail_response(ti_id=msg.ti_id)
        if kind == "UpdateHITLDetail":
            return caller.client.hitl.update_response(ti_id=msg.ti_id, chosen_options=msg.chosen_options,
                                                      params_input=msg.params_input)
        resp, _dump_opts = self._handlers[kind](caller.client, msg)
        if "AssetStateStore" in kind and not kind.startswith("Get"):  # as Airflow's triggerer answers them
            from airflow.sdk.execution_time.comms import OKResponse

            return OKResponse(ok=True)
        return resp

    def answered(self) -> set[str]:
        """The request types this runner answers with the installed Task SDK."""
        return set(self._handlers) | (set(_OTHER_REQUESTS) if self._handlers else set())

    def _note_token(self, caller: Caller) -> None:
        token = getattr(caller.client.auth, "token", None)
        if isinstance(token, str) and token and token != caller.token:
            # Reported before it counts as known: a report that raised is made again on the next answer.
            self._on_token(caller.ti_id, token)
            caller.token = token


def _load_handlers() -> dict[str, Callable[[Any, Any], tuple[Any, dict[str, bool]]]]:
    """The installed Task SDK's handler of each request type triggers may send (Task SDK 1.3 and
    later ship them in ``request_handlers``); a missing one leaves its type unanswered."""
    try:
        from airflow.sdk.execution_time import request_handlers
    except ImportError:
        return {}
    return {kind: fn for kind, name in TRIGGER_REQUESTS.items() if (fn := getattr(request_handlers, name, None))}


def _note_refusal(caller: Caller, resp: Any) -> None:
    """Keep the egress policy's message of a refused request (the Task SDK drops a 403's body)."""
    if resp.status_code in (403, 413) and resp.headers.get("content-type", "").startswith("application/json"):
        resp.read()
        detail = (_json_or_none(resp) or {}).get("detail")
        if isinstance(detail, str) and detail.startswith(_POLICY_PREFIX):
            caller.refusal.message = detail


def _json_or_none(resp: Any) -> Any:
    try:
        return resp.json()
    except Exception:  # not JSON, or no body
        return None
