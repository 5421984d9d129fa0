"""Rented-machine lifecycle: exit when idle, drain fast on a preemption notice, warm models at start.

* ``exit_when_idle_s``: after that long with no job running and none fetched, the worker shuts
  down like on SIGTERM (drain, report offline) and ``run()`` returns 3, so a wrapper script or
  the cloud can stop the machine (and tell it from an operator's stop, which returns 0).
* ``preemption_notice_file``: when the file appears (a spot-termination watcher writes it), the
  worker stops fetching and drains with ``preemption_drain_timeout_s`` instead of
  ``drain_timeout_s``, a shorter grace and shorter waits, and ``run()`` returns 4. A SIGTERM that
  arrives while the file exists drains the same way.
* ``warm_models``: loaded once in a separate process at start, so the first task does not pay
  for building caches (ONNX export, quantisation) and reading weights from a cold disk. The
  worker process itself never imports the runners' heavy dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Mapping

from airflow_outpost.worker.config import Settings, without_credentials
from airflow_outpost.worker.units import format_duration

log = logging.getLogger(__name__)

# Runs in a child process, so the worker never imports the runners' heavy dependencies. With the
# worker's model service, the models are loaded into it (and stay loaded for tasks); without it,
# ``warm(model)`` of the warm module builds and caches what the first task would need.
_WARM_SCRIPT = """
import importlib, os, sys
if os.environ.get("OUTPOST_MODEL_SOCKET"):
    from airflow_outpost.runners.model_service.client import ModelClient
    with ModelClient(autostart=False) as client:
        for name in sys.argv[2:]:
            client.load(None if name in ("default", "packaged") else name)
            print("warmed", name, flush=True)
    sys.exit(0)
warm = importlib.import_module(sys.argv[1]).warm
for name in sys.argv[2:]:
    warm(None if name in ("default", "packaged") else name)
    print("warmed", name, flush=True)
"""


class Lifecycle:
    """Per-iteration checks of the worker's main loop plus model warming. ``aclose()`` is safe twice.

    ``running()`` says how many jobs run now, ``shutdown()`` starts the worker's drain (called at
    most once per reason), ``task_env()`` is the environment a task process would get (the warming
    process gets it, less the worker's credentials).
    """

    warm_module = "airflow_outpost.runners.embeddings.embedder"

    def __init__(self, settings: Settings, *, running: Callable[[], int], shutdown: Callable[[], None],
                 task_env: Callable[[], Mapping[str, str]], clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._running = running
        self._shutdown = shutdown
        self._task_env = task_env
        self.clock = clock
        self.idle_since = clock()
        self.preempted = False
        self.exited_idle = False
        self._warm: asyncio.Task[None] | None = None
        self.warm_result: dict[str, str] = {}

    def tick(self) -> None:
        """Called once per main-loop iteration: idle exit and preemption notice."""
        s = self.settings
        now = self.clock()
        running = self._running()
        if running:
            self.idle_since = now
        if s.preemption_notice_file is not None and not self.preempted and s.preemption_notice_file.exists():
            self.preempted = True
            log.warning("preemption notice %s: no new jobs; draining %d job(s) for up to %s",
                        s.preemption_notice_file, running, format_duration(s.preemption_drain_timeout_s))
            self._shutdown()
            return
        if s.exit_when_idle_s and not running and now - self.idle_since >= s.exit_when_idle_s:
            self.exited_idle = True
            log.info("no work for %s (exit_when_idle_s): signing off and exiting", format_duration(now - self.idle_since))
            self._shutdown()

    def preempted_now(self) -> bool:
        """True after a preemption notice, or while the notice file exists (a SIGTERM then counts too)."""
        s = self.settings
        return self.preempted or (s.preemption_notice_file is not None and s.preemption_notice_file.exists())

    def drain_timeout_s(self) -> float:
        """The drain timeout to use now: short after a preemption notice, else ``drain_timeout_s``."""
        s = self.settings
        return min(s.preemption_drain_timeout_s, s.drain_timeout_s) if self.preempted_now() else s.drain_timeout_s

    # -- model warming -----------------------------------------------------------------------
    def start_warming(self) -> None:
        models = self.settings.warm_models
        if models and self._warm is None:
            self._warm = asyncio.create_task(self._warm_models(models), name="warm models")

    async def _warm_models(self, models: tuple[str, ...]) -> None:
        started = time.monotonic()
        log.info("warming models in the background: %s", ", ".join(models))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-c", _WARM_SCRIPT, self.warm_module, *models, env=without_credentials(dict(self._task_env())),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.error("could not start model warming: %s", exc)
            return
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        text = out.decode(errors="replace")
        for name in models:
            self.warm_result[name] = "warm" if f"warmed {name}\n" in text else "failed"
        if proc.returncode == 0:
            log.info("warmed %d model(s) in %.1fs", len(models), time.monotonic() - started)
        else:
            log.error("warming models failed (exit %s); tasks will load them cold:\n%s", proc.returncode, text[-2000:])

    async def warmed(self) -> dict[str, str]:
        """Wait for the warming started by :meth:`start_warming` (if any); return each model's
        outcome, ``"warm"`` or ``"failed"``. Cancelling the wait does not stop the warming."""
        if self._warm is not None:
            await asyncio.shield(self._warm)
        return dict(self.warm_result)

    async def aclose(self) -> None:
        task, self._warm = self._warm, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

