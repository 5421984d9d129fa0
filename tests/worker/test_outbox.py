"""The durable outbox and the token-expiry check, without a control plane."""

from __future__ import annotations

import time
from pathlib import Path

import jwt

from airflow_outpost.worker.edge.jobs import JobKey
from airflow_outpost.worker.edge.tokens import expired_for
from airflow_outpost.worker.runtime.outbox import Outbox

A = JobKey("d", "a", "r", 1, -1, "ti-a")
B = JobKey("d", "b", "r", 1, 3, None)


def test_reports_survive_a_restart_in_order_and_leave_only_when_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite").open()
    box.put(A, "running")
    box.put(B, "running")
    box.put(A, "success")
    box.put_worker("w1", "offline")
    box.close()

    box = Outbox(tmp_path / "outbox.sqlite").open()  # a new process
    pending = box.pending()
    assert [(r.kind, r.key, r.state) for r in pending] == [
        ("job", A, "running"), ("job", B, "running"), ("job", A, "success"), ("worker", None, "offline")]
    assert box.final_state(A) == "success" and box.final_state(B) is None
    box.ack(pending[0].seq)
    assert [r.state for r in box.pending()][:1] == ["running"] and box.depth == 3
    # An ack is not synced on its own; every later report still is (2 = FULL).
    assert box.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert box.drop_worker_reports() == 1 and box.depth == 2
    box.close()
    box.close()  # idempotent


def test_queuing_the_same_report_twice_sends_it_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite").open()
    first = box.put(A, "failed", note="token expired in queue")
    assert box.put(A, "failed") == first and box.depth == 1
    assert box.pending()[0].note == "token expired in queue"


def test_an_unopened_outbox_is_empty() -> None:
    box = Outbox(Path("/nonexistent/o.sqlite"))
    assert box.depth == 0 and box.pending() == [] and box.final_state(A) is None


def test_expired_for_reads_exp_without_the_signing_key() -> None:
    now = time.time()
    old = jwt.encode({"sub": "ti", "exp": int(now) - 90}, "k" * 64, algorithm="HS512")
    fresh = jwt.encode({"sub": "ti", "exp": int(now) + 600}, "x" * 64, algorithm="HS512")
    assert 89 <= expired_for(old, now) <= 91
    assert expired_for(fresh, now) is None
    assert expired_for("not-a-jwt") is None and expired_for(None) is None and expired_for("") is None
    assert expired_for(jwt.encode({"sub": "ti"}, "x" * 64, algorithm="HS512")) is None  # no exp: not ours to judge


def test_reports_of_a_job_claimed_elsewhere_can_be_dropped(tmp_path) -> None:
    from airflow_outpost.worker.edge.jobs import JobKey
    from airflow_outpost.worker.runtime.outbox import Outbox

    box = Outbox(tmp_path / "outbox.sqlite").open()
    mine = JobKey("d", "t", "r", 1, 3, None)
    other = JobKey("d", "t", "r", 1, 4, None)
    box.put(mine, "running")
    box.put(other, "running")
    assert box.drop_job_reports(mine) == 1
    assert [r.key for r in box.pending()] == [other]
    box.close()
