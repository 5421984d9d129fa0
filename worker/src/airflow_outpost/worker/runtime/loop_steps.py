"""Bounded steps of the worker's main loop, and the state folder's free space.

:class:`LoopSteps` runs each step of the main loop (heartbeat, fetch, status write, local
maintenance requests, lifecycle, budgets): an error that escapes a step is logged, counted
(``outpost_worker_loop_errors_total{step}``) and the step is retried with jittered exponential
backoff, so no step's error ever ends ``Worker.run()`` and leaves running tasks undrained. What
is failing, how often and since when is shown in ``status.json`` (``loop_errors``).

:class:`DiskSpace` watches the state folder's file system: below ``min_free_bytes`` free, or
after a write failed with ENOSPC/EDQUOT, the worker is *degraded*: it takes no new jobs (their
journal entries and reports could not be written), keeps running the ones it has, and says why in
``status.json`` and ``/readyz``. It recovers by itself once twice ``min_free_bytes`` are free.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

STEP_BACKOFF_BASE_S = 0.5
STEP_BACKOFF_CAP_S = 10.0
MIN_FREE_BYTES = 1 << 20  # a few status files, journal entries and outbox rows
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass
class _Step:
    failures: int = 0  # in a row
    total: int = 0
    last_error: str | None = None
    failing_since: float | None = None  # time.time() of the first failure in a row
    retry_at: float = 0.0  # time.monotonic() before which the step is skipped


class LoopSteps:
    """Runs main-loop steps so that an error in one is contained. ``on_error(step)`` counts it."""

    def __init__(self, on_error: Callable[[str], None], *, base_s: float = STEP_BACKOFF_BASE_S,
                 cap_s: float = STEP_BACKOFF_CAP_S) -> None:
        self._on_error = on_error
        self._base_s = base_s
        self._cap_s = cap_s
        self._steps: dict[str, _Step] = {}

    def due(self, step: str) -> bool:
        """False while ``step`` waits out its backoff after a failure."""
        state = self._steps.get(step)
        return state is None or time.monotonic() >= state.retry_at

    async def run(self, step: str, fn: Callable[[], Awaitable[T]], default: T) -> T:
        """``await fn()``; ``default`` if it raised or the step is backing off."""
        if not self.due(step):
            return default
        try:
            result = await fn()
        except Exception as exc:  # contained by design: see the module docstring
            self.failed(step, exc)
            return default
        self._succeeded(step)
        return result

    def call(self, step: str, fn: Callable[[], T], default: T) -> T:
        """``fn()``; ``default`` if it raised or the step is backing off."""
        if not self.due(step):
            return default
        try:
            result = fn()
        except Exception as exc:  # contained by design: see the module docstring
            self.failed(step, exc)
            return default
        self._succeeded(step)
        return result

    def failed(self, step: str, exc: BaseException) -> None:
        """Count a failure of ``step`` and schedule its retry."""
        state = self._steps.setdefault(step, _Step())
        state.failures += 1
        state.total += 1
        state.last_error = f"{type(exc).__name__}: {exc}"
        if state.failing_since is None:
            state.failing_since = time.time()
        delay = min(self._cap_s, self._base_s * 2 ** (state.failures - 1)) * random.uniform(0.8, 1.0)
        state.retry_at = time.monotonic() + delay
        self._on_error(step)
        if state.failures == 1:
            log.error("main-loop step %r failed; the worker goes on and retries it in %.1fs", step, delay,
                      exc_info=exc)
        else:
            log.warning("main-loop step %r failed again (%d in a row): %s; next try in %.1fs", step,
                        state.failures, state.last_error, delay)

    def _succeeded(self, step: str) -> None:
        state = self._steps.get(step)
        if state is None or state.failures == 0:
            return
        log.info("main-loop step %r works again after %d failure(s)", step, state.failures)
        state.failures, state.failing_since, state.retry_at = 0, None, 0.0

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every step that ever failed: failures in a row, in all, the last error, since when."""
        return {name: {"failing": s.failures, "total": s.total, "last_error": s.last_error,
                       "failing_since": s.failing_since} for name, s in self._steps.items()}


class DiskSpace:
    """Whether the state folder has room for what the worker must write (see the module docstring)."""

    def __init__(self, folder: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.folder = folder
        self.min_free_bytes = min_free_bytes
        self.reason: str | None = None

    @property
    def full(self) -> bool:
        return self.reason is not None

    def free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.folder)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def check(self) -> None:
        """Re-read the free space: degrade below ``min_free_bytes``, recover at twice that."""
        free = self.free_bytes()
        if free is None:
            return
        if free < self.min_free_bytes:
            self._degrade(f"the state folder {self.folder} has {free // 1024} KiB free "
                          f"(the worker needs {self.min_free_bytes // 1024} KiB)")
        elif self.reason is not None and free >= 2 * self.min_free_bytes:
            log.warning("the state folder %s has %d KiB free again: taking jobs again", self.folder, free // 1024)
            self.reason = None

    def write_failed(self, what: str, exc: OSError) -> bool:
        """A write to the state folder failed: True (and degraded) if the disk is full."""
        if exc.errno not in FULL_ERRNOS:
            return False
        self._degrade(f"writing {what} in {self.folder} failed: {os.strerror(exc.errno or 0)}")
        return True

    def _degrade(self, reason: str) -> None:
        if self.reason is None:
            log.error("%s: not taking new jobs; running ones go on. Free space there to recover.", reason)
        self.reason = reason
