"""Delivers the outbox to the control plane: every job state and worker state the worker owes it.

:class:`ReportSender` is the outbox's one sender (:mod:`airflow_outpost.worker.runtime.outbox` holds the
reports durably). A report leaves the outbox only when the server accepted it, or, refused for good,
into the dead-letter table; never silently. Order is kept per subject: a job's reports go oldest
first and one at a time, while a job whose report the server keeps refusing is skipped (with its own
backoff), so it never blocks another job's reports. What each answer does:

* accepted: the row is deleted (:meth:`Outbox.ack`).
* no answer at all (:class:`ConnectError`): every report waits; jittered backoff capped at 15 s;
  :meth:`wake` retries at once when the control plane is back.
* 401/403 (:class:`AuthError`: a secret rotated on the server first, clock skew) or our own credential
  unreadable (:class:`CredentialError`: an empty secret file mid-rotation): every report waits and is
  retried with the same backoff; logged at most once a minute, counted (``failures``).
* 5xx/429 or a bug in delivery: that subject backs off alone; the others go on.
* any other refusal (404/409/422 ...): retried ``REJECT_TRIES`` times, then moved to the dead-letter
  table with the server's answer (:meth:`Outbox.bury`), shown by ``outpost status`` and ``/metrics``.

Before a job's final state, ``before_final`` ships what is left of its log (see
:mod:`airflow_outpost.worker.runtime.task_logs`), so a log push that failed is retried with the final
report; after ``LOG_TAIL_TRIES`` tries in a row that ship none of it, the state goes without the rest.
``aclose()`` stops it and closes the outbox; what is undelivered is replayed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.errors import AuthError, ConnectError, CredentialError, OutpostError
from airflow_outpost.worker.runtime.outbox import FINAL_STATES, Outbox, Report

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.edge.jobs import JobKey
    from airflow_outpost.worker.runtime.link import ControlPlaneLink

log = logging.getLogger(__name__)

REJECT_TRIES = 5  # a refusal other than auth/5xx this often in a row: the report is dead-lettered
LOG_TAIL_TRIES = 20  # tries in a row that ship none of a finished job's log before its state goes without it
AUTH_LOG_EVERY_S = 60.0
BACKOFF_CAP_S = 15.0


def _backoff(failures: int, base_s: float = 0.5) -> float:
    """Jittered exponential backoff for the ``failures``-th failure in a row, capped at 15 s."""
    return random.uniform(base_s / 2, min(BACKOFF_CAP_S, base_s * 2 ** min(failures, 5)))


class ReportSender:
    """Sends ``outbox`` through ``client``; ``sysinfo`` rides along with worker states, ``before_final``
    (a job's key) runs before that job's final state is sent and raises to hold it back."""

    def __init__(self, outbox: Outbox, *, client: EdgeClient, settings: Settings, link: ControlPlaneLink,
                 sysinfo: Callable[[], dict[str, Any]],
                 before_final: Callable[[JobKey], Awaitable[None]] | None = None, retry_base_s: float = 0.5) -> None:
        self.outbox = outbox
        self.client = client
        self.settings = settings
        self.link = link
        self.sysinfo = sysinfo
        self.before_final = before_final
        self.retry_base_s = retry_base_s  # the first retry comes after about this long
        self.failures: dict[str, int] = {}  # failed deliveries by reason, for /metrics
        self._wake = asyncio.Event()
        # subject -> (monotonic time of its next try, (seq of the failing report, its tries in a row))
        self._retry_at: dict[str, tuple[float, tuple[int, int]]] = {}
        self._log_tail_failures: dict[str, int] = {}
        self._warned_at: float | None = None
        self._blocked_by: str | None = None  # why every report waits: unreachable, auth, credentials
        self._blocked_since: float | None = None
        self._last_error: str | None = None
        self._sender: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Reports not yet acknowledged by the control plane."""
        return self.outbox.depth

    def put_job(self, key: JobKey, state: str, note: str | None = None) -> None:
        self.outbox.put(key, state, note)
        self._wake.set()

    def put_worker(self, state: str, note: str | None = None) -> None:
        self.outbox.put_worker(self.settings.name, state, note)
        self._wake.set()

    def wake(self) -> None:
        """The control plane is back: send what the outbox holds now, not after the backoff."""
        self._wake.set()

    def start(self) -> None:
        """Start delivering (once the outbox is open). Idempotent."""
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="outbox sender")

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the outbox to empty; True if it did."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while self.outbox.depth and time.monotonic() < deadline and self._sender is not None and not self._sender.done():
            await asyncio.sleep(0.05)
        return self.outbox.depth == 0

    async def aclose(self) -> None:
        """Stop the sender and close the outbox; what is undelivered stays for the next start. Idempotent."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        self.outbox.close()

    def describe(self) -> dict[str, Any]:
        """For ``outpost status`` and ``/metrics``: pending and dead-lettered reports, why delivery waits."""
        return {"pending": self.outbox.depth, "dead_letters": self.outbox.dead_letter_count,
                "dead_letter_recent": self.outbox.dead_letters(limit=5),
                "blocked_by": self._blocked_by, "blocked_since": self._blocked_since,
                "last_error": self._last_error, "failures": dict(self.failures)}

    async def _send(self) -> None:
        """Deliver the outbox forever: per subject oldest first, each failure handled as the module says."""
        failures = 0  # rounds in a row that every report waited (unreachable, or auth)
        while True:
            self._wake.clear()
            blocked = await self._round()
            if blocked is None:
                failures = 0
                self._blocked_by = self._blocked_since = None
                timeout = self._next_subject_try() if self.outbox.depth else None
            else:
                failures += 1
                if self._blocked_by != blocked:
                    self._blocked_by, self._blocked_since = blocked, time.time()
                timeout = _backoff(failures, self.retry_base_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _next_subject_try(self) -> float | None:
        """Seconds until the earliest subject in backoff may be tried again (None: none is)."""
        if not self._retry_at:
            return None
        return max(0.0, min(t for t, _ in self._retry_at.values()) - time.monotonic())

    async def _round(self) -> str | None:
        """Deliver every report that may go now; return why all of them wait (None: they do not)."""
        now = time.monotonic()
        skip = {subject for subject, (at, _) in self._retry_at.items() if at > now}
        while True:
            report = next((r for r in self.outbox.heads() if r.subject not in skip), None)
            if report is None:
                return None
            try:
                await self._deliver(report)
            except ConnectError as exc:
                self._count("unreachable", exc)
                self._warn_waiting(f"the control plane is unreachable ({exc})")
                return "unreachable"
            except (AuthError, CredentialError) as exc:
                reason = "auth" if isinstance(exc, AuthError) else "credentials"
                self._count(reason, exc)
                self._warn_waiting(f"{'the control plane refuses our credentials' if reason == 'auth' else 'our credential cannot be read'}"
                                   f" ({exc}); retrying until it does", every_s=AUTH_LOG_EVERY_S)
                return reason
            except OutpostError as exc:
                skip.add(report.subject)
                if exc.retryable:  # 5xx / 429: this report's subject waits, the others go on
                    self._count("server", exc)
                    self._retry_later(report, exc)
                    continue
                self._count("rejected", exc)
                tries = self._retry_later(report, exc)
                if tries >= REJECT_TRIES:
                    log.error("the control plane refused the report %s %s %d times (%s); it is kept in the dead-letter "
                              "table (outpost status)", report.subject, report.state, tries, exc)
                    self.outbox.bury(report, str(exc))
                    self._retry_at.pop(report.subject, None)
                    skip.discard(report.subject)  # its next report may go now
                continue
            except Exception as exc:  # a bug must not stop reporting; the row stays for the next try
                log.exception("sending report %s %s failed", report.subject, report.state)
                skip.add(report.subject)
                self._count("error", exc)
                self._retry_later(report, exc)
                continue
            self.outbox.ack(report.seq)
            self._retry_at.pop(report.subject, None)
            self._log_tail_failures.pop(report.subject, None)
            self._warned_at = None

    def _retry_later(self, report: Report, exc: BaseException) -> int:
        """Back ``report``'s subject off; return how many times in a row this report failed."""
        _, (seq, tries) = self._retry_at.get(report.subject, (0.0, (report.seq, 0)))
        tries = tries + 1 if seq == report.seq else 1
        self._retry_at[report.subject] = (time.monotonic() + _backoff(tries, self.retry_base_s), (report.seq, tries))
        if tries == 1 or tries % 10 == 0:
            log.warning("report %s %s was not accepted (%s); try %d, retrying it alone", report.subject, report.state,
                        exc, tries)
        return tries

    def _count(self, reason: str, exc: BaseException) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self._last_error = f"{reason}: {exc}"[:500]

    def _warn_waiting(self, why: str, every_s: float = 0.0) -> None:
        now = time.monotonic()
        if self._warned_at is None or (every_s and now - self._warned_at >= every_s) \
                or (not every_s and self.failures.get("unreachable", 0) % 10 == 0):
            log.warning("%d report(s) wait: %s", self.outbox.depth, why)
            self._warned_at = now

    async def _deliver(self, report: Report) -> None:
        s = self.settings
        if report.kind == "job":
            assert report.key is not None
            if report.state in FINAL_STATES and self.before_final is not None:
                await self._ship_log_tail(report)
            await self.client.jobs.set_state(report.key, report.state)
        else:
            await self.client.worker.set_state(s.name, report.state, 0, self.link.queues, self.sysinfo(),
                                                 report.note, s.team_name)

    async def _ship_log_tail(self, report: Report) -> None:
        """Ship what is left of the job's log; give up on it (not on the state) after ``LOG_TAIL_TRIES``."""
        assert report.key is not None and self.before_final is not None
        before = self.outbox.log_tail(report.key)
        try:
            await self.before_final(report.key)
        except (ConnectError, AuthError, CredentialError):
            raise
        except OutpostError as exc:
            if self.outbox.log_tail(report.key) != before:  # it shipped some: only tries that ship none count
                self._log_tail_failures.pop(report.subject, None)
                self._retry_at.pop(report.subject, None)  # and the next try comes soon
            tries = self._log_tail_failures[report.subject] = self._log_tail_failures.get(report.subject, 0) + 1
            if tries < LOG_TAIL_TRIES:
                raise
            log.error("gave up pushing the rest of the log of %s after %d tries (%s); its final state goes without it",
                      report.subject, tries, exc)
            self.outbox.drop_log_tail(report.key)
