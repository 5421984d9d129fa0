"""Request accounting: how many requests the worker sends to the control plane, idle and busy.

Server load is the price of fast pickup, so the worker measures what it costs: every request is
recorded, and time is split into idle (no task running) and busy periods, giving requests/s for
each. ``outpost status`` and a periodic log line show the figures.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RequestCounter:
    """Counts requests; attributes them to idle or busy time. Not thread-safe (one event loop)."""

    window_s: float = 60.0
    total: int = 0
    _recent: deque[float] = field(default_factory=deque)
    _busy: bool = False
    _since: float = field(default_factory=time.monotonic)
    _seconds: dict[bool, float] = field(default_factory=lambda: {False: 0.0, True: 0.0})
    _requests: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})

    def record(self) -> None:
        now = time.monotonic()
        self.total += 1
        self._requests[self._busy] += 1
        self._recent.append(now)
        self._trim(now)

    def set_busy(self, busy: bool) -> None:
        """Mark the start of a busy (some task running) or idle period."""
        if busy == self._busy:
            return
        now = time.monotonic()
        self._seconds[self._busy] += now - self._since
        self._busy, self._since = busy, now

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] < now - self.window_s:
            self._recent.popleft()

    def rate(self) -> float:
        """Requests/s over the last ``window_s`` seconds."""
        now = time.monotonic()
        self._trim(now)
        return len(self._recent) / self.window_s

    def rates(self) -> dict[str, float]:
        """Lifetime requests/s while idle and while busy, and the recent overall rate."""
        now = time.monotonic()
        seconds = dict(self._seconds)
        seconds[self._busy] += now - self._since
        out = {"recent": round(self.rate(), 3)}
        for busy, label in ((False, "idle"), (True, "busy")):
            out[label] = round(self._requests[busy] / seconds[busy], 3) if seconds[busy] > 1 else 0.0
        out["total"] = self.total
        return out
