"""Cost ledger and daily budgets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from airflow_outpost.worker.hosted.costs import BudgetGuard, CostLedger, LiveTask


def _ts(day: int, hour: int = 12) -> float:
    return datetime(2030, 1, day, hour, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _rec(ledger: CostLedger, task: str, queue: str, dag: str, start: float, secs: float, gpus: int = 0) -> None:
    ledger.record(dag_id=dag, task_id=task, run_id="r", try_number=1, map_index=-1, queue=queue, state="success",
                  started=start, ended=start + secs, gpus=gpus)


def test_ledger_sums_wall_and_gpu_seconds_per_queue_and_dag(tmp_path: Path) -> None:
    ledger = CostLedger(tmp_path / "c.sqlite")
    _rec(ledger, "a", "gpu", "train", _ts(1), 100, gpus=2)
    _rec(ledger, "b", "gpu", "train", _ts(1), 50, gpus=1)
    _rec(ledger, "c", "cpu", "etl", _ts(1), 30)
    _rec(ledger, "c", "cpu", "etl", _ts(1), 40)  # same try recorded again replaces it
    assert sorted(ledger.totals("queue_dag")) == [("cpu", "etl", 40.0, 0.0), ("gpu", "train", 150.0, 250.0)]
    ledger.close()
    ledger.close()
    # Survives a restart.
    assert CostLedger(tmp_path / "c.sqlite").totals("queue_dag")


def test_queue_budget_pauses_that_queue_only_and_rolls_over(tmp_path: Path) -> None:
    clock = Clock(_ts(1, 20))
    ledger = CostLedger(tmp_path / "c.sqlite", {"queue:gpu": 3600.0}, clock=clock)
    _rec(ledger, "a", "gpu", "train", _ts(1, 10), 1000, gpus=2)  # 2000 GPU-seconds
    _rec(ledger, "b", "cpu", "etl", _ts(1, 10), 9000)
    assert ledger.paused() == {}
    # A running task counts with its time so far.
    paused = ledger.paused([LiveTask("train", "gpu", 900, 2)])
    assert set(paused) == {"gpu"} and paused["gpu"].spent_s == 3800
    _rec(ledger, "c", "gpu", "train", _ts(1, 11), 1000, gpus=2)
    assert set(ledger.paused()) == {"gpu"}
    assert "queue gpu paused: budget queue:gpu spent" in ledger.paused()["gpu"].describe()
    clock.t = _ts(2, 0) + 1  # the UTC day rolls over
    assert ledger.paused() == {}
    # Yesterday's spend is not today's.
    assert ledger.spent_today("queue:gpu") == 0


def test_dag_budget_pauses_the_queues_the_dag_ran_on(tmp_path: Path) -> None:
    clock = Clock(_ts(1, 20))
    ledger = CostLedger(tmp_path / "c.sqlite", {"dag:train": 60.0}, clock=clock)
    _rec(ledger, "a", "q1", "train", _ts(1, 10), 50)
    _rec(ledger, "b", "q2", "other", _ts(1, 10), 500)
    assert ledger.paused() == {}
    paused = ledger.paused([LiveTask("train", "q3", 20, 0)])
    assert set(paused) == {"q1", "q3"}


def test_guard_logs_pause_and_resume_once(tmp_path: Path, caplog) -> None:
    clock = Clock(_ts(1, 20))
    ledger = CostLedger(tmp_path / "c.sqlite", {"queue:q": 10.0}, clock=clock)
    guard = BudgetGuard(ledger, every_s=0)
    assert guard.refresh() == {} and guard.note() is None
    _rec(ledger, "a", "q", "d", _ts(1, 10), 11)
    with caplog.at_level("INFO", logger="airflow_outpost.worker.hosted.costs"):
        guard.refresh()
        guard.refresh()
        assert "queue q paused" in guard.note()
        ledger.budgets["queue:q"] = 20.0  # raised
        assert guard.refresh() == {}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["queue q paused", "queue q resumed"]


def test_a_recorded_task_survives_a_worker_killed_without_closing_the_ledger(tmp_path: Path) -> None:
    # The ledger does not fsync each row (WAL, synchronous=NORMAL); a commit must still be in the
    # log when record() returns, so a worker that dies right after loses nothing.
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from airflow_outpost.worker.hosted.costs import CostLedger\n"
        "ledger = CostLedger(sys.argv[1])\n"
        "ledger.record(dag_id='d', task_id='t', run_id='r', try_number=1, map_index=-1, queue='q',\n"
        "              state='success', started=0.0, ended=30.0, gpus=1)\n"
        "os._exit(0)  # no close(), no checkpoint: as if killed\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.sqlite")], check=True, timeout=60)
    ledger = CostLedger(tmp_path / "c.sqlite")
    assert ledger.totals("queue_dag") == [("q", "d", 30.0, 30.0)]
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ledger.close()
