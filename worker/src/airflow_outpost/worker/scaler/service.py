"""The scaler's state: the last queue depths read, when, and why the last read failed.

:class:`Scaler` refreshes on demand, at most once per ``refresh_interval_s`` whatever the number of
callers (one control plane, many queues and ScaledObjects): concurrent callers share one round
(single flight), and a failed round is remembered for the same interval, so an unreachable control
plane is not hammered either. Values older than ``stale_after_s`` after a failed round are not
served: KEDA gets an error (503) and holds the current replica count instead of scaling to zero on
a number nobody measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from airflow_outpost.worker.errors import OutpostError
from airflow_outpost.worker.scaler.depth import QueueDepth


class DepthSource(Protocol):
    async def read(self, queues: tuple[str, ...] = ()) -> dict[str, QueueDepth]: ...


class Unavailable(OutpostError):
    """No queue depth fresh enough to scale on; ``str()`` says why (for /healthz and KEDA)."""

    retryable = True


@dataclass(frozen=True)
class Snapshot:
    """Queue depths as read at ``read_at`` (wall clock)."""

    depths: dict[str, QueueDepth]
    read_at: float

    def document(self, concurrency: int, now: float) -> dict[str, Any]:
        """The JSON KEDA's ``metrics-api`` scaler reads: ``queues.<queue>.workers`` is the value."""
        return {
            "concurrency": concurrency,
            "age_s": round(max(0.0, now - self.read_at), 3),
            "queues": {q: {"queued": d.queued, "running": d.running, "queued_slots": d.queued_slots,
                           "running_slots": d.running_slots, "slots": d.slots, "workers": d.workers(concurrency)}
                       for q, d in sorted(self.depths.items())},
        }


@dataclass
class _State:
    snapshot: Snapshot | None = None
    last_attempt: float = float("-inf")  # monotonic
    last_error: str | None = None
    failing_since: float | None = None  # wall clock
    rounds: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})


class Scaler:
    """Cached, rate-limited queue depth. ``current()`` returns a fresh-enough :class:`Snapshot` or
    raises :class:`Unavailable`; ``health()`` says ``(ok, why)``. Cancel-safe: a cancelled caller
    leaves the shared round running for the others."""

    def __init__(self, source: DepthSource, *, queues: tuple[str, ...] = (), refresh_interval_s: float = 10.0,
                 stale_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.source, self.queues = source, queues
        self.refresh_interval_s, self.stale_after_s = refresh_interval_s, stale_after_s
        self._clock, self._wall = clock, wall
        self._state = _State()
        self._round: asyncio.Task[None] | None = None

    async def current(self) -> Snapshot:
        if self._clock() - self._state.last_attempt >= self.refresh_interval_s:
            if self._round is None or self._round.done():
                self._round = asyncio.create_task(self._refresh())
            await asyncio.shield(self._round)
        return self._usable()

    async def _refresh(self) -> None:
        s = self._state
        s.last_attempt = self._clock()
        try:
            depths = await self.source.read(self.queues)
        except OutpostError as exc:
            s.rounds["error"] += 1
            s.last_error = f"{type(exc).__name__}: {exc}"
            if s.failing_since is None:
                s.failing_since = self._wall()
            return
        for q in self.queues:  # listed queues are always there, empty or not
            depths.setdefault(q, QueueDepth())
        s.rounds["ok"] += 1
        s.snapshot, s.last_error, s.failing_since = Snapshot(depths, self._wall()), None, None

    def _usable(self) -> Snapshot:
        s = self._state
        if s.last_error is None and s.snapshot is not None:
            return s.snapshot
        if s.snapshot is not None and self._wall() - s.snapshot.read_at <= self.stale_after_s:
            return s.snapshot  # one failed round: the last values still stand, for a while
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.failing_since)) if s.failing_since else "start"
        last = (f"; last good read {self._wall() - s.snapshot.read_at:.0f}s ago" if s.snapshot is not None
                else "; no good read yet")
        raise Unavailable(f"control plane unreachable since {since}: {s.last_error or 'not read yet'}{last}")

    def wall(self) -> float:
        """The wall clock the snapshots are stamped with."""
        return self._wall()

    async def health(self) -> tuple[bool, str]:
        """``(True, "ok: ...")`` while values are fresh enough to scale on, else ``(False, why)``."""
        try:
            snap = await self.current()
        except Unavailable as exc:
            return False, str(exc)
        note = f" (last round failed: {self._state.last_error})" if self._state.last_error else ""
        return True, f"ok: control plane read {self._wall() - snap.read_at:.1f}s ago{note}"

    def collector(self) -> Collector:
        return _ScalerCollector(self._state, self._wall)

    def metrics(self) -> bytes:
        """Prometheus text for what was last read (no REST call of its own)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector())
        return generate_latest(registry)


class _ScalerCollector(Collector):
    def __init__(self, state: _State, wall: Callable[[], float]) -> None:
        self._state, self._wall = state, wall

    def collect(self):  # type: ignore[no-untyped-def]
        s = self._state
        up = GaugeMetricFamily("outpost_scaler_up", "1 when the last read of the control plane succeeded")
        up.add_metric([], 0.0 if s.last_error or s.snapshot is None else 1.0)
        yield up
        rounds = CounterMetricFamily("outpost_scaler_rounds", "rounds of REST reads, by result", labels=["result"])
        for result, n in sorted(s.rounds.items()):
            rounds.add_metric([result], n)
        yield rounds
        tasks = GaugeMetricFamily("outpost_scaler_queue_tasks", "task instances per queue and state",
                                  labels=["queue", "state"])
        slots = GaugeMetricFamily("outpost_scaler_queue_slots", "pool slots the task instances take, per queue and state",
                                  labels=["queue", "state"])
        age = GaugeMetricFamily("outpost_scaler_last_read_age_seconds", "seconds since the last good read")
        if s.snapshot is not None:
            for q, d in sorted(s.snapshot.depths.items()):
                tasks.add_metric([q, "queued"], d.queued)
                tasks.add_metric([q, "running"], d.running)
                slots.add_metric([q, "queued"], d.queued_slots)
                slots.add_metric([q, "running"], d.running_slots)
            age.add_metric([], max(0.0, self._wall() - s.snapshot.read_at))
        yield tasks
        yield slots
        yield age
