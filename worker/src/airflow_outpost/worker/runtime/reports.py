"""Delivers the outbox to the control plane: every job state and worker state the worker owes it.

:class:`ReportSender` is the outbox's one sender (:mod:`airflow_outpost.worker.runtime.outbox` holds the
reports durably). It delivers oldest first and acknowledges a report only once the server did, so a
report is never lost and never overtaken by a later one of the same job. While the control plane is
unreachable it backs off (jittered, capped at 15 s); :meth:`wake` retries at once. A 4xx is logged and
dropped (retrying cannot make the server accept it); a bug in delivery keeps the row for the next try.
``aclose()`` stops it and closes the outbox; what is undelivered is replayed at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.errors import OutpostError
from airflow_outpost.worker.runtime.outbox import Outbox, Report

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.edge.jobs import JobKey
    from airflow_outpost.worker.runtime.link import ControlPlaneLink

log = logging.getLogger(__name__)


class ReportSender:
    """Sends ``outbox`` in order through ``client``; ``sysinfo`` rides along with worker states."""

    def __init__(self, outbox: Outbox, *, client: EdgeClient, settings: Settings, link: ControlPlaneLink,
                 sysinfo: Callable[[], dict[str, Any]]) -> None:
        self.outbox = outbox
        self.client = client
        self.settings = settings
        self.link = link
        self.sysinfo = sysinfo
        self._wake = asyncio.Event()
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

    async def _send(self) -> None:
        """Deliver the outbox oldest first, forever; back off (jittered, capped) while unreachable."""
        failures = 0
        while True:
            self._wake.clear()
            blocked = False
            for report in self.outbox.pending():
                try:
                    await self._deliver(report)
                except OutpostError as exc:
                    if exc.retryable:
                        failures += 1
                        if failures == 1 or failures % 10 == 0:
                            log.warning("%d report(s) wait for the control plane (%s)", self.outbox.depth, exc)
                        blocked = True
                        break
                    log.error("the control plane refused the report %s %s: %s", report.subject, report.state, exc)
                except Exception:  # a bug must not stop reporting; the row stays for the next try
                    log.exception("sending report %s %s failed", report.subject, report.state)
                    blocked = True
                    break
                self.outbox.ack(report.seq)
                failures = 0
            timeout = random.uniform(0.25, min(15.0, 0.5 * 2 ** min(failures, 5))) if blocked else None
            if not blocked and self.outbox.depth:
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, report: Report) -> None:
        s = self.settings
        if report.kind == "job":
            assert report.key is not None
            await self.client.jobs.set_state(report.key, report.state)
        else:
            await self.client.worker.set_state(s.name, report.state, 0, self.link.queues, self.sysinfo(),
                                                 report.note, s.team_name)
