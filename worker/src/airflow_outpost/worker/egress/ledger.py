"""The egress ledger: a local, append-only, tamper-evident record of what left the region.

One SQLite file in the state folder (``egress.sqlite``). Each row says when, which task, which
endpoint and method, the egress kind, how many bytes were sent (and received), the status, whether
the policy refused it (and by which rule), and the SHA-256 of the body. Each row also stores
``hash = HMAC-SHA256(key, previous row's hash + the row's fields)``, so editing, deleting or
reordering a row breaks the chain from that row on, and without the key nobody can compute a new
chain over an edit; :func:`verify` finds the first bad row. The key lives in
``<state-folder>/keys/ledger.key`` (folder 0700, file 0600), created at the ledger's first start;
task processes are not given it. Rows written before the key existed (older versions: plain
SHA-256) stay valid as *legacy* rows: the key file records how many there were, and the first
keyed row's HMAC covers their head, so they cannot be re-chained either once a keyed row follows.
Truncating the tail cannot be seen from the file alone: keep the head hash ``verify`` prints
somewhere else if that matters. Triggers refuse UPDATE and DELETE through SQLite itself.

Writes are batched so the ledger does not slow tasks: :meth:`Ledger.record` only puts the row on
a queue; a writer thread commits every ``flush_interval_s`` or ``batch_rows`` rows, whichever
comes first. :meth:`Ledger.close` writes what is queued; it is safe before ``start`` and twice.
The chain continues across restarts (the writer starts from the last stored hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_outpost.worker.edge.jobs import CALLBACK_DAG_ID
from airflow_outpost.worker.errors import OutpostError

GENESIS = "0" * 64
FIELDS = ("ts", "task", "endpoint", "method", "kind", "bytes", "bytes_in", "status", "outcome", "rule", "digest")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS egress (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, task TEXT, endpoint TEXT NOT NULL, method TEXT NOT NULL, kind TEXT NOT NULL,
    bytes INTEGER NOT NULL, bytes_in INTEGER NOT NULL, status INTEGER, outcome TEXT NOT NULL,
    rule TEXT, digest TEXT, hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS egress_ts ON egress(ts);
CREATE TRIGGER IF NOT EXISTS egress_no_update BEFORE UPDATE ON egress
BEGIN SELECT RAISE(ABORT, 'the egress ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS egress_no_delete BEFORE DELETE ON egress
BEGIN SELECT RAISE(ABORT, 'the egress ledger is append-only'); END;
"""


@dataclass(frozen=True)
class Entry:
    """One request that left (``outcome="sent"``), was refused, or failed in transit."""

    ts: float
    task: str | None
    endpoint: str
    method: str
    kind: str
    bytes: int
    bytes_in: int = 0
    status: int | None = None
    outcome: str = "sent"  # sent | refused | kept (answered locally) | error | rejected (an incoming job we refused)
    rule: str | None = None
    digest: str | None = None

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in FIELDS)


def chain_hash(previous: str, values: tuple[Any, ...], key: bytes | None = None) -> str:
    """The row hash over the previous hash and the canonical JSON of the row's fields: HMAC-SHA256
    with ``key``, plain SHA-256 (a legacy row) without."""
    message = f"{previous}|{json.dumps(list(values), separators=(',', ':'), ensure_ascii=True)}".encode()
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class LedgerKeyError(OutpostError):
    """The ledger's key file exists but cannot be read or used."""


@dataclass(frozen=True)
class LedgerKey:
    """The chain's HMAC key, and how many rows (ids ``1..legacy_rows``) predate it."""

    secret: bytes = dataclasses.field(repr=False)
    legacy_rows: int = 0


def key_path(path: Path) -> Path:
    """Where the key of the ledger at ``path`` lives: ``keys/ledger.key`` beside it."""
    return Path(path).parent / "keys" / "ledger.key"


def load_key(path: Path) -> LedgerKey | None:
    """The key of the ledger at ``path``; ``None`` if it has none (a legacy ledger)."""
    kp = key_path(path)
    try:
        data = json.loads(kp.read_text())
        return LedgerKey(bytes.fromhex(data["key"]), int(data.get("legacy_rows", 0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LedgerKeyError(f"unreadable egress ledger key {kp}: {exc}") from exc


def _create_key(path: Path, legacy_rows: int) -> LedgerKey:
    """A new random key, written 0600 in a 0700 folder (temp file, fsync, rename)."""
    kp = key_path(path)
    kp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(kp.parent, 0o700)  # mkdir's mode is subject to the umask, and exist_ok keeps an old folder's
    key = LedgerKey(secrets.token_bytes(32), legacy_rows)
    tmp = kp.with_name(f".{kp.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"key": key.secret.hex(), "legacy_rows": legacy_rows,
                                 "created": time.time()}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, kp)
    return key


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class Ledger:
    """Batched, hash-chained writer. ``record()`` never blocks on disk."""

    def __init__(self, path: Path, *, flush_interval_s: float = 0.1, batch_rows: int = 500) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.batch_rows = batch_rows
        self._queue: queue.SimpleQueue[Entry | threading.Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        """Open the file and start the writer thread (idempotent)."""
        if self._thread is not None:
            return
        db = connect(self.path)
        row = db.execute("SELECT id, hash FROM egress ORDER BY id DESC LIMIT 1").fetchone()
        try:
            key = load_key(self.path) or _create_key(self.path, legacy_rows=row[0] if row else 0)
        except BaseException:
            db.close()
            raise
        self._thread = threading.Thread(target=self._writer, args=(db, row[1] if row else GENESIS, key.secret),
                                        name="egress-ledger", daemon=True)
        self._thread.start()

    def record(self, entry: Entry) -> None:
        """Queue one row; it is written within ``flush_interval_s``.

        If the writer thread died (``error`` says why, e.g. a full disk), rows are counted in
        ``dropped`` instead of piling up in memory; the gap shows in ``written``.
        """
        if self._closed:
            return
        if self._thread is not None and not self._thread.is_alive():
            self.dropped += 1
            return
        self._queue.put(entry)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Block until every row recorded before this call is committed."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued and stop the writer. Safe before ``start()`` and twice."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)

    def _writer(self, db: sqlite3.Connection, head: str, key: bytes) -> None:
        stop = False
        try:
            while not stop:
                batch: list[Entry] = []
                waiters: list[threading.Event] = []
                try:
                    item = self._queue.get(timeout=self.flush_interval_s)
                except queue.Empty:
                    continue
                deadline = time.monotonic() + self.flush_interval_s
                while True:
                    if item is None:
                        stop = True
                    elif isinstance(item, threading.Event):
                        waiters.append(item)
                    else:
                        batch.append(item)
                    if stop or waiters or len(batch) >= self.batch_rows:
                        break
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                if batch:
                    rows = []
                    for e in batch:
                        values = e.values()
                        head = chain_hash(head, values, key)
                        rows.append((*values, head))
                    with db:
                        db.executemany(f"INSERT INTO egress ({', '.join(FIELDS)}, hash) "
                                       f"VALUES ({', '.join('?' * (len(FIELDS) + 1))})", rows)
                    self.written += len(rows)
                for w in waiters:
                    w.set()
        except BaseException as exc:  # surfaced by the worker's status and by tests
            self.error = exc
            raise
        finally:
            db.close()


# -- reading: verify and report --------------------------------------------------------------

@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows: int
    head: str
    bad_row: dict[str, Any] | None = None
    reason: str | None = None
    legacy_rows: int = 0  # rows verified by the plain, unkeyed chain (written before the key existed)
    keyed: bool = True  # False: the ledger has no key file, so every row is legacy


def _rows(db: sqlite3.Connection, where: str = "", params: tuple[Any, ...] = (),
          tail: str = "ORDER BY id") -> Iterator[dict[str, Any]]:
    cur = db.execute(f"SELECT id, {', '.join(FIELDS)}, hash FROM egress {where} {tail}", params)
    names = [d[0] for d in cur.description]
    for row in cur:
        yield dict(zip(names, row, strict=True))


def verify(path: Path) -> VerifyResult:
    """Walk the chain; return the first row whose hash does not follow from its predecessor.

    Rows up to the key's ``legacy_rows`` (all rows, for a ledger without a key) are checked
    against the plain SHA-256 chain, the rest against the HMAC chain. Raises
    :class:`LedgerKeyError` if the key file cannot be read.
    """
    key = load_key(path)
    secret, legacy_upto = (key.secret, key.legacy_rows) if key is not None else (None, 0)
    db = connect(path)
    try:
        head, count, last_id, legacy = GENESIS, 0, 0, 0
        for row in _rows(db):
            plain = secret is None or row["id"] <= legacy_upto
            expected = chain_hash(head, tuple(row[f] for f in FIELDS), None if plain else secret)
            if row["hash"] != expected:
                reason = ("row content or order changed, or a row before it was removed"
                          if row["id"] == last_id + 1 else f"rows {last_id + 1}..{row['id'] - 1} are missing")
                if key is None:
                    reason += f" (or it was written with a key, and {key_path(path)} is missing)"
                return VerifyResult(False, count, head, row, reason, legacy, key is not None)
            head, count, last_id, legacy = row["hash"], count + 1, row["id"], legacy + plain
        return VerifyResult(True, count, head, legacy_rows=legacy, keyed=key is not None)
    finally:
        db.close()


def _totals(db: sqlite3.Connection, name: str, group: str, where: str, params: list[float | str],
            order: str) -> list[dict[str, Any]]:
    """Requests, bytes sent (of rows that were sent), bytes received and refusals per value of the
    SQL expression ``group``, each row keyed ``name``."""
    return [
        {name: g, "requests": n, "bytes_sent": int(b or 0), "bytes_received": int(bi or 0), "refused": int(r or 0)}
        for g, n, b, bi, r in db.execute(
            f"SELECT {group}, COUNT(*), SUM(CASE WHEN outcome='sent' THEN bytes ELSE 0 END), SUM(bytes_in), "
            f"SUM(outcome='refused') FROM egress {where} GROUP BY 1 ORDER BY {order}", params)
    ]


def report(path: Path, *, since_s: float | None = None, task: str | None = None, top: int = 10) -> dict[str, Any]:
    """Totals by kind and by workload (task, callback, worker) and the largest items, for rows newer
    than ``since_s`` seconds matching ``task``."""
    clauses: list[str] = []
    params: list[float | str] = []
    if since_s is not None:
        clauses.append("ts >= ?")
        params.append(time.time() - since_s)
    if task:
        clauses.append("task LIKE ?")
        params.append(f"%{task}%")
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    db = connect(path)
    try:
        kinds = _totals(db, "kind", "kind", where, params, "3 DESC")
        # Which workload a row belongs to: a callback's label starts with its key's dag id, a task's
        # is its job key, the worker's own calls have none.
        workload = (f"CASE WHEN task IS NULL THEN 'worker' WHEN task LIKE '{CALLBACK_DAG_ID}.%' THEN 'callback' "
                    "ELSE 'task' END")
        workloads = _totals(db, "workload", workload, where, params, "1")
        largest = list(_rows(db, where, tuple(params), f"ORDER BY bytes DESC LIMIT {int(top)}"))
        refused = list(_rows(db, f"{where} {'AND' if where else 'WHERE'} outcome IN ('refused', 'rejected')",
                             tuple(params), f"ORDER BY id DESC LIMIT {int(top)}"))
    finally:
        db.close()
    return {"kinds": kinds, "workloads": workloads, "largest": largest, "refused": refused,
            "bytes_sent": sum(k["bytes_sent"] for k in kinds), "requests": sum(k["requests"] for k in kinds)}
