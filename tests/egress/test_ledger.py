"""The egress ledger: batched writes, the hash chain across restarts, tamper detection, report and CLI."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from airflow_outpost.worker.egress import ledger
from airflow_outpost.worker.egress.ledger import Entry, Ledger
from airflow_outpost.worker.testing.worker_process import run_outpost


def _entry(i: int, kind: str = "xcom", outcome: str = "sent", task: str = "d.t run=r1 try=1") -> Entry:
    return Entry(ts=time.time(), task=task, endpoint=f"/execution/xcoms/d/r/t/k{i}", method="POST", kind=kind,
                 bytes=100 * i, bytes_in=2, status=201 if outcome == "sent" else 413, outcome=outcome,
                 rule="max_xcom_bytes" if outcome == "refused" else None, digest=f"{i:064x}")


def _fill(path: Path, n: int, start: int = 1, **kw) -> None:
    led = Ledger(path, **kw)
    led.start()
    for i in range(start, start + n):
        led.record(_entry(i))
    led.close()


def test_rows_survive_restarts_and_the_chain_continues(tmp_path: Path) -> None:
    path = tmp_path / "egress.sqlite"
    _fill(path, 5)
    _fill(path, 7, start=6)
    result = ledger.verify(path)
    assert result.ok and result.rows == 12
    data = ledger.report(path)
    assert data["requests"] == 12 and data["bytes_sent"] == 100 * sum(range(1, 13))
    assert [r["bytes"] for r in data["largest"][:2]] == [1200, 1100]


def test_batches_are_committed_without_close(tmp_path: Path) -> None:
    path = tmp_path / "egress.sqlite"
    led = Ledger(path, flush_interval_s=0.05, batch_rows=3)
    led.start()
    for i in range(10):
        led.record(_entry(i))
    led.flush()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM egress").fetchone()[0] == 10
    led.close()
    led.close()  # safe twice
    Ledger(tmp_path / "never-started.sqlite").close()  # safe before start


def test_ledger_refuses_update_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "egress.sqlite"
    _fill(path, 2)
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE egress SET bytes = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM egress")


def _tamper(path: Path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(f"DROP TRIGGER egress_no_update; DROP TRIGGER egress_no_delete; {sql};")
    db.commit()
    db.close()


@pytest.mark.parametrize(("sql", "bad_id", "reason"), [
    ("UPDATE egress SET bytes = 1 WHERE id = 4", 4, "content"),
    ("UPDATE egress SET kind = 'state' WHERE id = 7", 7, "content"),
    ("DELETE FROM egress WHERE id = 3", 4, "missing"),
])
def test_verify_finds_the_first_tampered_row(tmp_path: Path, sql: str, bad_id: int, reason: str) -> None:
    path = tmp_path / "egress.sqlite"
    _fill(path, 8)
    _tamper(path, sql)
    result = ledger.verify(path)
    assert not result.ok and result.bad_row is not None and result.bad_row["id"] == bad_id
    assert reason in (result.reason or "")


def test_cli_report_and_verify(tmp_path: Path) -> None:
    state = tmp_path / "state"
    led = Ledger(state / "egress.sqlite")
    led.start()
    for i in range(1, 4):
        led.record(_entry(i))
    led.record(_entry(9, outcome="refused", task="big.produce run=r2 try=1"))
    led.record(_entry(1, kind="heartbeat", task="big.produce run=r2 try=1"))
    led.close()

    out = run_outpost("egress", "report", "--since", "1h", "--state-folder", str(state))
    assert out.returncode == 0, out.stderr
    assert "xcom" in out.stdout and "heartbeat" in out.stdout and "max_xcom_bytes" in out.stdout
    out = run_outpost("egress", "report", "--task", "big.produce", "--json", "--state-folder", str(state))
    import json

    data = json.loads(out.stdout)
    assert data["requests"] == 2 and {k["kind"] for k in data["kinds"]} == {"xcom", "heartbeat"}

    ok = run_outpost("egress", "verify", "--state-folder", str(state))
    assert ok.returncode == 0 and "5 row(s)" in ok.stdout
    _tamper(state / "egress.sqlite", "UPDATE egress SET bytes = 0 WHERE id = 2")
    bad = run_outpost("egress", "verify", "--state-folder", str(state))
    assert bad.returncode == 1 and "TAMPERED: row 2" in bad.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_writer_drops_rows_instead_of_piling_them_up(tmp_path: Path) -> None:
    path = tmp_path / "egress.sqlite"
    led = Ledger(path, flush_interval_s=0.02)
    led.start()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE egress;")  # e.g. the file was replaced under the worker
    db.close()
    led.record(_entry(1))
    deadline = time.monotonic() + 10
    while led.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert isinstance(led.error, sqlite3.OperationalError)
    led._thread.join(5)
    led.record(_entry(2))
    led.record(_entry(3))
    assert led.dropped == 2 and led.written == 0
    led.close()
