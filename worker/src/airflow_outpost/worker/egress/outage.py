"""Riding out control-plane outages: the egress gateway's view of its upstream.

While the Execution API cannot be reached (connection refused or reset, DNS failure, timeouts, or
a 502/503/504 from a proxy in front of it), :meth:`airflow_outpost.worker.egress.gateway.Gateway._forward` holds each
task's request and retries it, waiting with :meth:`Outage.wait`: jittered exponential backoff
capped at ``cap_s``, cut short the moment any request gets through again, so held requests are
delivered within a round trip of the control plane's return instead of up to a backoff cap later.
A request is held at most ``hold_s`` seconds (``outage_hold_s``), then answered 502.

The worker's own Edge API heartbeats probe the same server: when one gets through,
:meth:`Outage.nudge` makes held requests retry at once, and :attr:`Outage.on_up` tells the worker
when a held request got through first, so each side notices the return as soon as either does.

Task heartbeats are not held: while the upstream is down the gateway answers them 204 itself (the
task is alive; that is all a heartbeat says), and forwards the next one for real with a short
timeout, which doubles as the probe that notices the control plane is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Answers that mean "the control plane is not there right now", not "your request is wrong".
OUTAGE_STATUSES = frozenset({502, 503, 504})
_HEARTBEAT = re.compile(r"/task-instances/[^/?]+/heartbeat(\?|$)")


class Outage:
    """Whether the upstream is reachable, since when it is not, and the backoff for held requests."""

    def __init__(self, hold_s: float, *, base_s: float = 0.25, cap_s: float = 5.0,
                 heartbeat_timeout_s: float = 5.0) -> None:
        self.hold_s = hold_s
        self.base_s, self.cap_s = base_s, cap_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.down_since: float | None = None
        self.holding = 0  # requests waiting for the control plane right now
        self.held_total = 0  # requests that had to wait, since start
        self.local_heartbeats = 0  # heartbeats answered here while the upstream was down
        self.outages = 0
        self._back = asyncio.Event()
        # Called (no arguments, must not raise) when the upstream is found reachable again.
        self.on_up: Callable[[], None] | None = None

    @staticmethod
    def is_heartbeat(method: str, url: str) -> bool:
        return method == "PUT" and _HEARTBEAT.search(url) is not None

    def down(self, reason: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            log.warning("gateway: control plane unreachable (%s); holding task requests for up to %.0fs",
                        reason, self.hold_s)

    def up(self) -> None:
        if self.down_since is None:
            return
        log.info("gateway: control plane reachable again after %.1fs; delivering %d held request(s)",
                 time.monotonic() - self.down_since, self.holding)
        self.down_since = None
        self._wake_waiters()
        if self.on_up is not None:
            self.on_up()

    def nudge(self) -> None:
        """Another client reached the control plane: held requests retry now, not after their
        backoff. Only a request of their own that gets through ends the outage."""
        if self.down_since is not None:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        back, self._back = self._back, asyncio.Event()
        back.set()

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the ``attempt``-th retry (1-based), capped."""
        return random.uniform(self.base_s / 2, min(self.cap_s, self.base_s * 2 ** attempt))

    async def wait(self, attempt: int, remaining_s: float) -> None:
        """Sleep before the next try; returns early when another request found the upstream back."""
        back = self._back
        try:
            await asyncio.wait_for(back.wait(), max(0.0, min(self.delay(attempt), remaining_s)))
        except TimeoutError:
            pass
