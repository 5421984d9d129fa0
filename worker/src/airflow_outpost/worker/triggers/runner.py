"""The trigger runner: a child process of the worker that runs every waiting task's trigger.

``python -m airflow_outpost.worker.triggers.runner`` reads one JSON object per line on stdin and
writes one per line on stdout:

* in ``{"op": "run", "id", "classpath", "kwargs", "next_method", "next_kwargs", "log", "api", "token"}``:
  import ``classpath`` (only a subclass of Airflow's ``BaseTrigger`` is built), decode ``kwargs``
  with Airflow's own serialisation (``airflow.sdk.serde``,
  or ``BaseSerialization`` for what a Task SDK 1.1 wrote; never pickle, and serde only builds the
  classes ``[core] allowed_deserialization_classes`` allows), build the trigger and run it until
  its first event. A ``run`` for an id that runs already is ignored (a restarted host resends).
* in ``{"op": "cancel", "id"}``: cancel that trigger (its ``cleanup()`` runs).
* in ``{"op": "token", "id", "token"}``: the try's newer token (the worker's heartbeat got one).
* out ``{"op": "token", "id", "token"}``: the server refreshed the try's token on a trigger's request.
* out ``{"op": "ready"}`` once, then per trigger one ``{"op": "done", "id", "end", ...}``:
  ``end = "resume"`` with ``next_kwargs`` (the task's stored ``next_kwargs`` plus ``event``, the
  event's payload, encoded as the task's Task SDK encodes them, as Airflow's triggerer does);
  ``end = "task_end"`` with ``state`` and ``xcoms`` for a ``TaskSuccessEvent`` /
  ``TaskFailedEvent`` / ``TaskSkippedEvent`` (the task ends without resuming); ``end = "fail"``
  with ``error`` and ``traceback`` (a list of lines) when the class does not import, the kwargs
  do not decode, the trigger raises or ends without an event.

Triggers get the Task SDK's comms (``SUPERVISOR_COMMS``) as under Airflow's triggerer: Variables,
Connections, XComs, task-instance and DAG-run counts and states, ... answered through the egress
gateway (``api``) with the try's own ``token`` (:mod:`~airflow_outpost.worker.triggers.comms`).

All triggers share one asyncio loop, like Airflow's triggerer: a trigger that blocks the loop
delays the others, but never the worker, which only reads this process's pipe. What a trigger
logs goes, as JSON lines like the Task SDK's, to its task's log file (``log``).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

from airflow_outpost.worker.triggers.comms import TriggerComms

_LOG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("outpost_trigger_log", default=None)
_END_STATES = {"success", "failed", "skipped"}


class TriggerFailed(Exception):
    """A trigger could not be built or run; its message goes to the task log (``__fail__``)."""


# -- serialisation -----------------------------------------------------------------------------
def _is_base_serialization(raw: Any) -> bool:
    """True for ``BaseSerialization`` output (``{"__type": ..., "__var": ...}``, Task SDK 1.1)."""
    return isinstance(raw, dict) and set(raw) == {"__type", "__var"}


def decode(raw: Any) -> Any:
    """Decode kwargs the Task SDK serialised (serde, or BaseSerialization for Task SDK 1.1)."""
    if _is_base_serialization(raw):
        from airflow.serialization.serialized_objects import BaseSerialization

        return BaseSerialization.deserialize(raw)
    from airflow.sdk.serde import deserialize

    return deserialize(raw)


def encode_like(value: Any, like: Any) -> Any:
    """Encode ``value`` the way ``like`` was encoded, so the task's own Task SDK decodes it."""
    if _is_base_serialization(like):
        from airflow.serialization.serialized_objects import BaseSerialization

        return BaseSerialization.serialize(value)
    from airflow.sdk.serde import serialize

    return serialize(value)


def resume_kwargs(next_kwargs: Any, payload: Any) -> Any:
    """The ``next_kwargs`` a task resumes with: its own plus ``event`` (Airflow's ``handle_event_submit``)."""
    kwargs = decode(next_kwargs or {}) if next_kwargs else {}
    if not isinstance(kwargs, dict):
        raise TriggerFailed(f"the task's next_kwargs decoded to {type(kwargs).__name__}, expected a dict")
    kwargs["event"] = payload
    return encode_like(kwargs, next_kwargs or {})


# -- logging into the task's log ---------------------------------------------------------------
def _write_log_line(record: dict[str, Any]) -> None:
    path = _LOG_FILE.get()
    if path is None:
        return
    # What the Task SDK's log processors do for tasks: a connection's password or a secret Variable
    # a trigger logs is registered with this process's masker (comms' MaskSecret) and written as ***.
    record = _redact()(record)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
    except OSError:
        pass  # the task log is best effort: a full disk must not fail the trigger


@functools.cache
def _redact() -> Callable[[Any], Any]:
    """The Task SDK's ``redact`` (``airflow.sdk.log`` from Task SDK 1.2, ``secrets_masker`` in 1.1)."""
    try:
        from airflow.sdk.log import redact
    except ImportError:
        from airflow.sdk.execution_time.secrets_masker import redact  # type: ignore[no-redef]
    return redact


class _TaskLogHandler(logging.Handler):
    """Routes stdlib log records of a trigger to its task's log file."""

    def emit(self, record: logging.LogRecord) -> None:
        _write_log_line({"timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
                         "level": record.levelname.lower(), "event": record.getMessage(), "logger": record.name})


class _StructlogSink:
    """structlog's final logger: every level writes the processed event dict to the task log."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def _write(self, *args: Any, **event: Any) -> None:
        # structlog passes the processed event dict as keyword arguments; drop its private keys.
        record = {k: v for k, v in event.items() if not k.startswith("__")}
        if args:
            record.setdefault("event", " ".join(str(a) for a in args))
        _write_log_line(record)

    msg = info = debug = warning = warn = error = critical = exception = fatal = failure = err = _write


def _configure_logging() -> None:
    import structlog

    def _route(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("level", method if method != "warn" else "warning")
        return event

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.TimeStamper(fmt="iso", key="timestamp"),
                    _add_logger_name, _format_positional, _route],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=lambda *args: _StructlogSink(str(args[0]) if args else None), cache_logger_on_first_use=False)
    root = logging.getLogger()
    root.handlers[:] = [_TaskLogHandler()]
    root.setLevel(logging.INFO)


def _add_logger_name(logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    name = getattr(logger, "name", None)
    if name:
        event.setdefault("logger", name)
    return event


def _format_positional(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``log.info("%d seconds", n)``: structlog keeps the args apart; render them like logging does."""
    args = event.pop("positional_args", None)
    if args and isinstance(event.get("event"), str):
        try:
            event["event"] = event["event"] % tuple(args)
        except (TypeError, ValueError):
            event["event"] = f"{event['event']} {args!r}"
    return event


# -- running triggers ----------------------------------------------------------------------------
def build(classpath: str, raw_kwargs: Any) -> Any:
    """Import and construct the trigger; :class:`TriggerFailed` with a message that names the problem."""
    from airflow.sdk.module_loading import import_string
    from airflow.triggers.base import BaseTrigger

    try:
        cls = import_string(classpath)
    except (ImportError, ValueError) as exc:
        raise TriggerFailed(f"trigger class {classpath!r} is not importable on this worker "
                            f"({type(exc).__name__}: {exc}); install it where the worker runs (a package, or a module "
                            "in the DAG or plugins folder)") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseTrigger)):
        # A deferral names what the runner calls: anything else (os.system, builtins.eval) is refused unbuilt.
        raise TriggerFailed(f"{classpath!r} is not a trigger class (a subclass of airflow.triggers.base.BaseTrigger); "
                            "the worker refuses to build it")
    try:
        kwargs = decode(raw_kwargs or {})
    except Exception as exc:  # whatever the decoder raises on foreign data
        raise TriggerFailed(f"the kwargs of trigger {classpath} could not be decoded with Airflow's serialisation "
                            f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(kwargs, dict):
        raise TriggerFailed(f"the kwargs of trigger {classpath} decoded to {type(kwargs).__name__}, expected a dict")
    return cls(**kwargs)


async def run_one(message: dict[str, Any], comms: TriggerComms | None = None) -> dict[str, Any]:
    """Run one trigger to its first event; the ``done`` message for it (never raises but for cancel).
    ``comms``: answers the trigger's Task SDK requests as its try (call it in the trigger's own task)."""
    out: dict[str, Any] = {"op": "done", "id": message["id"]}
    _LOG_FILE.set(Path(message["log"]) if message.get("log") else None)
    log = logging.getLogger("airflow_outpost.trigger")
    trigger = None
    try:
        if comms is not None:
            comms.caller(message["id"], message.get("api"), message.get("token"))
        if os.environ.get("AIRFLOW_DISABLE_GREENBACK_PORTAL", "").lower() != "true":
            import greenback

            await greenback.ensure_portal()  # sync SDK calls in async def run(), as Airflow's triggerer allows
        trigger = build(message["classpath"], message.get("kwargs"))
        log.info("trigger %s waits on worker %s (local triggers)", message["classpath"],
                 os.environ.get("OUTPOST_WORKER_NAME", "?"))
        async for event in trigger.run():
            state = getattr(event, "task_instance_state", None)
            if state is not None:
                state = str(getattr(state, "value", state))
                if state not in _END_STATES:
                    raise TriggerFailed(f"the trigger ended the task as {state!r}; only success, failed, skipped can be")
                log.info("trigger ended the task as %s", state)
                return {**out, "end": "task_end", "state": state, "xcoms": getattr(event, "xcoms", None)}
            log.info("trigger fired; the task resumes with %s", message["next_method"])
            try:
                kwargs = resume_kwargs(message.get("next_kwargs"), event.payload)
            except TriggerFailed:
                raise
            except Exception as exc:
                raise TriggerFailed(f"the event payload could not be serialised for the task "
                                    f"({type(exc).__name__}: {exc})") from exc
            return {**out, "end": "resume", "next_kwargs": kwargs}
        raise TriggerFailed(f"trigger {message['classpath']} ended without an event")
    except TriggerFailed as exc:
        log.error("%s", exc)
        return {**out, "end": "fail", "error": str(exc), "traceback": [str(exc)]}
    except Exception as exc:
        log.exception("trigger %s raised", message["classpath"])
        error = f"Trigger failure: {type(exc).__name__}: {exc}"
        if comms is not None and (unanswered := comms.unanswered(message["id"])) and unanswered not in error:
            error = f"{error} (after {unanswered})"  # what the Task SDK turned into another error
        return {**out, "end": "fail", "error": error,
                "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)}
    finally:
        if trigger is not None:
            try:
                cleaned = trigger.cleanup()
                if asyncio.iscoroutine(cleaned):  # async in Airflow 3
                    await cleaned
            except Exception:
                log.exception("cleanup of trigger %s raised", message["classpath"])


class Runner:
    """Reads commands, runs one asyncio task per trigger, writes each one's end.

    ``comms``: the Task SDK comms the triggers use (installed as ``SUPERVISOR_COMMS`` by ``main``)."""

    def __init__(self, out: TextIO, comms: TriggerComms | None = None) -> None:
        self.out = out
        self.comms = comms
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._emitting = threading.Lock()

    def emit(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=str) + "\n"
        with self._emitting:  # comms threads report refreshed tokens too: one whole line at a time
            self.out.write(line)
            self.out.flush()

    async def _run(self, message: dict[str, Any]) -> None:
        try:
            self.emit(await run_one(message, self.comms))
        except asyncio.CancelledError:
            pass
        finally:
            self.tasks.pop(message["id"], None)
            if self.comms is not None:
                self.comms.forget(message["id"])

    def handle(self, message: dict[str, Any]) -> None:
        op, ident = message.get("op"), message.get("id")
        if not isinstance(ident, str):
            return
        if op == "run" and ident not in self.tasks:
            self.tasks[ident] = asyncio.create_task(self._run(message), name=f"trigger {ident}")
        elif op == "cancel" and (task := self.tasks.get(ident)) is not None:
            task.cancel()
        elif op == "token" and self.comms is not None and isinstance(token := message.get("token"), str):
            self.comms.set_token(ident, token)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        self.emit({"op": "ready", "pid": os.getpid()})
        while line := await reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self.handle(message)
        for task in list(self.tasks.values()):  # the worker closed the pipe: it is gone or stopping
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _main() -> None:
    from airflow.sdk.execution_time import task_runner

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    runner: Runner | None = None

    def on_token(ti_id: str, token: str) -> None:  # from a comms thread; emit is thread-safe
        if runner is not None:
            runner.emit({"op": "token", "id": ti_id, "token": token})

    runner = Runner(sys.stdout, TriggerComms(on_token=on_token))
    # What Airflow's trigger runner sets: the Task SDK then asks local secrets backends, then comms.
    task_runner.SUPERVISOR_COMMS = runner.comms  # type: ignore[assignment]
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "client"
    await runner.serve(reader)


def main() -> None:
    import airflow.sdk  # noqa: F401  (Airflow configures its logging on import; ours goes on top)

    # task_runner (the comms' home) configures logging on import too: imported before ours, not after.
    from airflow.sdk.execution_time import task_runner  # noqa: F401

    for folder in (os.environ.get("AIRFLOW__CORE__DAGS_FOLDER"), os.environ.get("AIRFLOW__CORE__PLUGINS_FOLDER")):
        if folder and folder not in sys.path:
            sys.path.append(folder)  # where Airflow looks for DAG-local modules too
    _configure_logging()
    asyncio.run(_main())


if __name__ == "__main__":
    main()
