"""Cost accounting and daily budgets: what each task, DAG and queue cost, and when to stop.

Every finished task is recorded in ``costs.sqlite`` in the state folder: its wall-seconds and
GPU-seconds (wall time x devices held). Budgets are per UTC day, per queue (``queue:<name>``) or
per DAG (``dag:<dag_id>``), in *charged seconds*: GPU-seconds for tasks that held GPUs,
wall-seconds for those that did not. Running tasks count with their time so far.

When a queue's budget is spent the worker stops fetching from that queue. The Edge API cannot
filter by DAG, so a spent DAG budget pauses the queues that DAG's tasks ran on today. Fetching
resumes when the UTC day rolls over or the budget is raised (restart with the new setting; the
ledger survives restarts).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from airflow_outpost.worker.units import format_duration

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS task_costs (
    day TEXT NOT NULL,           -- UTC date the task ended, YYYY-MM-DD
    dag_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    try_number INTEGER NOT NULL,
    map_index INTEGER NOT NULL,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,       -- unix time
    ended REAL NOT NULL,
    wall_s REAL NOT NULL,
    gpus INTEGER NOT NULL,
    gpu_s REAL NOT NULL,
    PRIMARY KEY (dag_id, task_id, run_id, try_number, map_index)
);
CREATE INDEX IF NOT EXISTS task_costs_day ON task_costs (day);
"""


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def charged(wall_s: float, gpus: int) -> float:
    return wall_s * gpus if gpus > 0 else wall_s


@dataclass(frozen=True)
class LiveTask:
    """A task still running, for budget checks: its time so far counts."""

    dag_id: str
    queue: str
    elapsed_s: float
    gpus: int


@dataclass(frozen=True)
class Pause:
    queue: str
    budget: str
    spent_s: float
    limit_s: float

    def describe(self) -> str:
        return (f"queue {self.queue} paused: budget {self.budget} spent "
                f"({format_duration(self.spent_s)} of {format_duration(self.limit_s)} today, UTC)")


class CostLedger:
    """SQLite ledger of task costs plus the budget check. ``close()`` is safe twice."""

    def __init__(self, path: Path, budgets: Mapping[str, float] | Iterable[tuple[str, float]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.budgets = dict(budgets)
        self.clock = clock
        self._db: sqlite3.Connection | None = sqlite3.connect(self.path, isolation_level=None)
        # One row per finished task, written on the worker's event loop. In WAL mode with
        # synchronous=NORMAL a commit is in the log before it returns (a crashed worker loses
        # nothing) but is not fsynced: the default rollback journal took several syncs per task
        # (~10 ms of a loaded disk, during which the worker proxied nothing). A power cut can
        # lose the last rows, i.e. under-count today's spend by the tasks that just ended.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the cost ledger is closed")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def record(self, *, dag_id: str, task_id: str, run_id: str, try_number: int, map_index: int, queue: str,
               state: str, started: float, ended: float, gpus: int) -> None:
        """Record one finished task try (unix times). Recording the same try again replaces it."""
        wall = max(0.0, ended - started)
        self.db.execute(
            "INSERT OR REPLACE INTO task_costs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (utc_day(ended), dag_id, task_id, run_id, try_number, map_index, queue, state, started, ended,
             wall, gpus, wall * gpus),
        )

    # -- queries -----------------------------------------------------------------------------
    def totals(self, by: str) -> list[tuple[str, str, float, float]]:
        """Lifetime ``(queue, dag_id, wall_s, gpu_s)`` rows; ``by`` is 'queue_dag'."""
        assert by == "queue_dag"
        rows = self.db.execute("SELECT queue, dag_id, SUM(wall_s), SUM(gpu_s) FROM task_costs GROUP BY queue, dag_id")
        return [(q, d, float(w), float(g)) for q, d, w, g in rows]

    def spent_today(self, key: str, live: Iterable[LiveTask] = ()) -> float:
        """Charged seconds spent today (UTC) under budget ``key`` (``queue:x`` / ``dag:y``)."""
        kind, _, target = key.partition(":")
        column = {"queue": "queue", "dag": "dag_id"}[kind]
        day = utc_day(self.clock())
        (done,) = self.db.execute(
            f"SELECT COALESCE(SUM(CASE WHEN gpus > 0 THEN gpu_s ELSE wall_s END), 0) FROM task_costs "
            f"WHERE day = ? AND {column} = ?", (day, target)).fetchone()
        running = sum(charged(t.elapsed_s, t.gpus) for t in live
                      if (t.queue if kind == "queue" else t.dag_id) == target)
        return float(done) + running

    def queues_of_dag_today(self, dag_id: str) -> set[str]:
        day = utc_day(self.clock())
        return {q for (q,) in self.db.execute("SELECT DISTINCT queue FROM task_costs WHERE day = ? AND dag_id = ?",
                                                (day, dag_id))}

    def paused(self, live: Iterable[LiveTask] = ()) -> dict[str, Pause]:
        """Queues to stop fetching from now, each with the budget that paused it."""
        live = list(live)
        out: dict[str, Pause] = {}
        for key, limit in sorted(self.budgets.items()):
            spent = self.spent_today(key, live)
            if spent < limit:
                continue
            kind, _, target = key.partition(":")
            if kind == "queue":
                queues = {target}
            else:
                queues = self.queues_of_dag_today(target) | {t.queue for t in live if t.dag_id == target}
            for q in sorted(queues):
                out.setdefault(q, Pause(q, key, spent, limit))
        return out

    def budget_status(self, live: Iterable[LiveTask] = ()) -> list[tuple[str, float, float]]:
        """``(budget key, spent today, limit)`` for every configured budget."""
        live = list(live)
        return [(k, self.spent_today(k, live), v) for k, v in sorted(self.budgets.items())]


def live_tasks(running: Iterable[object], now: float | None = None) -> list[LiveTask]:
    """LiveTask views of the job runner's running jobs (``RunningJob``: job, started, devices)."""
    now = time.monotonic() if now is None else now
    out = []
    for r in running:
        job = r.job  # type: ignore[attr-defined]
        out.append(LiveTask(job.key.dag_id, job.queue, max(0.0, now - r.started),  # type: ignore[attr-defined]
                            len(getattr(r, "devices", ()))))
    return out


class BudgetGuard:
    """Decides which queues are paused by spent budgets; logs each pause and resume once."""

    def __init__(self, ledger: CostLedger, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.every_s = every_s
        self.clock = clock
        self.paused: dict[str, Pause] = {}
        self._due = 0.0

    def refresh(self, live: Iterable[LiveTask] = (), force: bool = False) -> dict[str, Pause]:
        """Recompute (at most every ``every_s``) and return the paused queues."""
        if not self.ledger.budgets:
            return self.paused
        now = self.clock()
        if not force and now < self._due:
            return self.paused
        self._due = now + self.every_s
        new = self.ledger.paused(live)
        for q in sorted(new.keys() - self.paused.keys()):
            log.warning("%s; no new jobs from it until the UTC day rolls over or the budget is raised", new[q].describe())
        for q in sorted(self.paused.keys() - new.keys()):
            log.info("queue %s resumed: budget %s has room again", q, self.paused[q].budget)
        self.paused = new
        return new

    def note(self) -> str | None:
        """One line for heartbeats and status, or None when nothing is paused."""
        if not self.paused:
            return None
        return "; ".join(p.describe() for p in self.paused.values())
