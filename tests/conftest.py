"""Shared fixtures: one real Airflow 3 control plane per test session (api-server, scheduler,
dag-processor with the Edge executor, SQLite, loopback ports)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.worker_process import WorkerProc
from tests.helpers import DAGS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(dags_folder=DAGS, home=tmp_path_factory.mktemp("airflow-home"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def start_worker(control_plane: ControlPlane, tmp_path: Path) -> Iterator:
    """Factory: ``start_worker(queues="q", concurrency=2, ...)`` -> a registered WorkerProc."""
    started: list[WorkerProc] = []

    def factory(wait: bool = True, **kwargs) -> WorkerProc:
        w = WorkerProc(control_plane, tmp_path, **kwargs).start(wait_registered=wait)
        started.append(w)
        return w

    yield factory
    for w in started:
        if w.proc is not None and w.proc.poll() is None:
            w.stop()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests are reported as skipped (never passed) where no CUDA device exists."""
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
