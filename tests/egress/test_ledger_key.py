"""The ledger's chain is keyed (HMAC-SHA256, key in the state folder): a row edited and the
plain SHA-256 chain recomputed from it, as anyone who can write the file could, fails verify.
Ledgers written before the key still verify, their rows reported as legacy."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from pathlib import Path

from airflow_outpost.worker.egress import ledger
from airflow_outpost.worker.egress.ledger import FIELDS, GENESIS
from airflow_outpost.worker.testing.worker_process import run_outpost
from tests.egress.test_ledger import _entry, _fill


def _plain(previous: str, values: tuple) -> str:
    """The unkeyed row hash older versions wrote (and anyone can compute)."""
    payload = json.dumps(list(values), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{previous}|{payload}".encode()).hexdigest()


def _edit_and_rechain(path: Path, sql: str, from_id: int = 1) -> None:
    """Edit rows, then recompute the plain SHA-256 chain of every row from ``from_id`` on."""
    db = sqlite3.connect(path)
    db.executescript(f"DROP TRIGGER egress_no_update; {sql};")
    rows = db.execute(f"SELECT id, {', '.join(FIELDS)}, hash FROM egress ORDER BY id").fetchall()
    head = GENESIS
    for row in rows:
        if row[0] >= from_id:
            head = _plain(head, tuple(row[1:-1]))
            db.execute("UPDATE egress SET hash = ? WHERE id = ?", (head, row[0]))
        else:
            head = row[-1]
    db.commit()
    db.close()


def _write_legacy(path: Path, n: int) -> None:
    """A ledger as versions before the key wrote it: the plain chain, no key file."""
    db = ledger.connect(path)
    head = GENESIS
    for i in range(1, n + 1):
        values = _entry(i).values()
        head = _plain(head, values)
        db.execute(f"INSERT INTO egress ({', '.join(FIELDS)}, hash) VALUES ({', '.join('?' * (len(FIELDS) + 1))})",
                   (*values, head))
    db.commit()
    db.close()


def test_the_key_is_created_at_first_start_readable_by_the_worker_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "egress.sqlite"
    _fill(path, 2)
    key = ledger.key_path(path)
    assert key.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    first = key.read_bytes()
    _fill(path, 2, start=3)  # a restart keeps the key and the chain
    assert key.read_bytes() == first and ledger.verify(path).ok


def test_a_row_edited_and_the_plain_chain_recomputed_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "egress.sqlite"
    _fill(path, 6)
    _edit_and_rechain(path, "UPDATE egress SET bytes = 1 WHERE id = 3")
    result = ledger.verify(path)
    assert not result.ok and result.bad_row is not None and result.bad_row["id"] == 1
    # Re-chaining only from the edited row on is caught at that row.
    path2 = tmp_path / "b" / "egress.sqlite"
    _fill(path2, 6)
    _edit_and_rechain(path2, "UPDATE egress SET bytes = 1 WHERE id = 4", from_id=4)
    result = ledger.verify(path2)
    assert not result.ok and result.bad_row is not None and result.bad_row["id"] == 4


def test_a_legacy_ledger_verifies_and_its_rows_are_reported_as_legacy(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = state / "egress.sqlite"
    _write_legacy(path, 3)
    _fill(path, 2, start=4)  # this version takes the ledger over: the rows it adds are keyed
    result = ledger.verify(path)
    assert result.ok and result.rows == 5 and result.legacy_rows == 3
    out = run_outpost("egress", "verify", "--state-folder", str(state))
    assert out.returncode == 0 and "3 legacy" in out.stdout, out.stdout + out.stderr
    # A legacy row edited and the plain chain recomputed up to the keyed rows: the first keyed row
    # no longer follows from its predecessor.
    _edit_and_rechain(path, "UPDATE egress SET bytes = 0 WHERE id = 2", from_id=2)
    result = ledger.verify(path)
    assert not result.ok and result.bad_row is not None and result.bad_row["id"] == 4
