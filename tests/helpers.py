"""Paths the tests share. Processes and fakes live in :mod:`airflow_outpost.worker.testing`."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "tests" / "dags"
