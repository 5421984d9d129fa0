"""The durable outbox: every state report the worker owes the control plane, in order.

A report (job ``running``/``success``/``failed``, worker ``offline``) is committed to
``outbox.sqlite`` in the state folder before anything is sent, and deleted only once the server
acknowledged it. :class:`JobRunner <airflow_outpost.worker.runtime.job_runner.JobRunner>` sends the rows oldest first, one
at a time, so a job's ``success`` never overtakes its ``running``; after an outage or a restart
whatever is left is replayed in the same order. Replays are idempotent: the Edge API accepts the
same job state twice, and :meth:`Outbox.put` does not queue a report that is already pending.

Order is kept per subject (one job, or the worker), not across them: the sender skips a job whose
oldest report the server keeps refusing, so one stuck job never holds back another's. A report the
server rejects for good (404/409/422 ...) after a few tries moves to the ``dead_letter`` table with
the reason (:meth:`Outbox.bury`), where ``outpost status`` and ``/metrics`` show it: never dropped
silently. ``log_tail`` rows hold the part of a finished job's log that could not be pushed yet
(path and acknowledged offset); the sender ships it before that job's final state.

Worker-state rows are only meaningful to the process that wrote them: a new process registers
afresh, so :meth:`Outbox.drop_worker_reports` discards them at start.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import NamedTuple

from airflow_outpost.worker.edge.jobs import JobKey

FINAL_STATES = ("success", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,           -- 'job' or 'worker'
    subject TEXT NOT NULL,        -- the JobKey as JSON, or the worker name
    state TEXT NOT NULL,
    note TEXT,
    created REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_once ON outbox (kind, subject, state);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,      -- the outbox row's seq
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    state TEXT NOT NULL,
    note TEXT,
    created REAL NOT NULL,
    buried REAL NOT NULL,
    reason TEXT NOT NULL          -- the server's last answer
);
CREATE TABLE IF NOT EXISTS log_tail (
    subject TEXT PRIMARY KEY,     -- the JobKey as JSON
    path TEXT NOT NULL,           -- the task log file
    offset INTEGER NOT NULL,      -- bytes of it the server acknowledged
    note TEXT                     -- pushed after the log (how the task process ended)
);
"""


class Report(NamedTuple):
    seq: int
    kind: str  # "job" | "worker"
    key: JobKey | None  # for job reports
    subject: str
    state: str
    note: str | None
    created: float


def _subject(key: JobKey) -> str:
    return json.dumps(key.as_dict(), sort_keys=True)


class Outbox:
    """A SQLite-backed FIFO of undelivered reports. ``open()``/``close()`` are idempotent."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only  # for readers beside the worker (outpost status): no writes, no schema
        self._db: sqlite3.Connection | None = None

    def open(self) -> Outbox:
        if self._db is None and self.read_only:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a report is on disk before it is sent
            db.executescript(_SCHEMA)
            self._db = db
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox used before open()")
        return self._db

    def put(self, key: JobKey, state: str, note: str | None = None) -> int:
        """Queue a job report durably; returns its sequence number (the pending one if already queued)."""
        return self._put("job", _subject(key), state, note)

    def put_worker(self, name: str, state: str, note: str | None = None) -> int:
        return self._put("worker", name, state, note)

    def _put(self, kind: str, subject: str, state: str, note: str | None) -> int:
        db = self.db
        db.execute("INSERT OR IGNORE INTO outbox (kind, subject, state, note, created) VALUES (?, ?, ?, ?, ?)",
                   (kind, subject, state, note, time.time()))
        row = db.execute("SELECT seq FROM outbox WHERE kind = ? AND subject = ? AND state = ?",
                         (kind, subject, state)).fetchone()
        return int(row[0])

    def pending(self, limit: int = 100) -> list[Report]:
        """The oldest undelivered reports, in the order they were queued."""
        if self._db is None:
            return []
        rows = self.db.execute("SELECT seq, kind, subject, state, note, created FROM outbox ORDER BY seq LIMIT ?",
                               (limit,)).fetchall()
        return [Report(seq, kind, JobKey(**json.loads(subject)) if kind == "job" else None, subject, state, note, created)
                for seq, kind, subject, state, note, created in rows]

    def heads(self) -> list[Report]:
        """The oldest undelivered report of each subject (job or worker), oldest first: what may go next."""
        if self._db is None:
            return []
        rows = self.db.execute("SELECT seq, kind, subject, state, note, created FROM outbox WHERE seq IN "
                               "(SELECT MIN(seq) FROM outbox GROUP BY kind, subject) ORDER BY seq").fetchall()
        return [Report(seq, kind, JobKey(**json.loads(subject)) if kind == "job" else None, subject, state, note, created)
                for seq, kind, subject, state, note, created in rows]

    def ack(self, seq: int) -> None:
        """The server acknowledged report ``seq``: forget it.

        Not fsynced (the next queued report's commit syncs it with its own): a power cut may bring
        the row back, and the report is sent again, which the Edge API accepts. Process crashes
        lose nothing either way (WAL)."""
        db = self.db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def bury(self, report: Report, reason: str) -> None:
        """The server refused ``report`` for good: move it to the dead-letter table with ``reason``
        (in one transaction, synced). Idempotent."""
        db = self.db
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO dead_letter (seq, kind, subject, state, note, created, buried, reason) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (report.seq, report.kind, report.subject, report.state,
                                                          report.note, report.created, time.time(), reason[:2000]))
            db.execute("DELETE FROM outbox WHERE seq = ?", (report.seq,))

    def dead_letters(self, limit: int = 100) -> list[dict[str, object]]:
        """Reports the server refused for good, newest first: subject, state, reason, when."""
        if self._db is None:
            return []
        rows = self.db.execute("SELECT seq, kind, subject, state, created, buried, reason FROM dead_letter "
                               "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [{"seq": seq, "kind": kind, "subject": json.loads(subject) if kind == "job" else subject, "state": state,
                 "queued": created, "buried": buried, "reason": reason}
                for seq, kind, subject, state, created, buried, reason in rows]

    @property
    def dead_letter_count(self) -> int:
        if self._db is None:
            return 0
        return int(self.db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])

    # -- log tails ----------------------------------------------------------------------------
    def put_log_tail(self, key: JobKey, path: Path, offset: int, note: str | None) -> None:
        """Remember (durably) that ``path`` from ``offset`` on, then ``note``, is still to be pushed for ``key``."""
        self.db.execute("INSERT OR REPLACE INTO log_tail (subject, path, offset, note) VALUES (?, ?, ?, ?)",
                        (_subject(key), str(path), offset, note))

    def log_tail(self, key: JobKey) -> tuple[Path, int, str | None] | None:
        if self._db is None:
            return None
        row = self.db.execute("SELECT path, offset, note FROM log_tail WHERE subject = ?", (_subject(key),)).fetchone()
        return (Path(row[0]), int(row[1]), row[2]) if row else None

    def advance_log_tail(self, key: JobKey, offset: int, note: str | None) -> None:
        """The server acknowledged the log of ``key`` up to ``offset`` (and the note, if now None)."""
        self.db.execute("UPDATE log_tail SET offset = ?, note = ? WHERE subject = ?", (offset, note, _subject(key)))

    def drop_log_tail(self, key: JobKey) -> None:
        self.db.execute("DELETE FROM log_tail WHERE subject = ?", (_subject(key),))

    def final_state(self, key: JobKey) -> str | None:
        """The final state queued for ``key`` and not yet delivered, if any."""
        if self._db is None:
            return None
        row = self.db.execute("SELECT state FROM outbox WHERE kind = 'job' AND subject = ? AND state IN (?, ?) "
                              "ORDER BY seq DESC LIMIT 1", (_subject(key), *FINAL_STATES)).fetchone()
        return row[0] if row else None

    def drop_job_reports(self, key: JobKey) -> int:
        """Discard undelivered reports for ``key`` (a job this worker turned out not to own)."""
        self.drop_log_tail(key)
        return self.db.execute("DELETE FROM outbox WHERE kind = 'job' AND subject = ?", (_subject(key),)).rowcount

    def drop_worker_reports(self) -> int:
        """Discard worker-state reports of a previous process (registration supersedes them)."""
        return self.db.execute("DELETE FROM outbox WHERE kind = 'worker'").rowcount

    @property
    def depth(self) -> int:
        """How many reports wait for the control plane (0 before ``open()``)."""
        if self._db is None:
            return 0
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])



def read_outbox(path: Path) -> dict[str, object] | None:
    """What ``outpost status`` shows of the outbox at ``path``, read-only (whether the worker runs or
    not): pending reports and dead letters (count and newest five); None if there is none to read."""
    if not Path(path).exists():
        return None
    box = Outbox(path, read_only=True)
    try:
        box.open()
        return {"pending": box.depth, "dead_letters": box.dead_letter_count, "dead_letter_recent": box.dead_letters(5)}
    except sqlite3.Error:  # an outbox of an older version (no dead-letter table yet) or not readable by us
        return None
    finally:
        box.close()
