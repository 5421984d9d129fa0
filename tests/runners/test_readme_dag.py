"""The docs' DAG-author example (Runners page) is the shipped outpost_search DAG, and it runs on the worker."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DOCS, REPO

EXAMPLE = REPO / "worker" / "src" / "airflow_outpost" / "worker" / "example_dags" / "outpost_search.py"


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / "runners.md").read_text(), re.S)


def test_readme_shows_the_shipped_example_verbatim() -> None:
    assert EXAMPLE.read_text() in _readme_python_blocks()


@pytest.fixture
def store_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="srch-"))  # short: the model service's socket lives under it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_readme_example_embeds_indexes_and_answers_on_the_worker(control_plane, start_worker, store_root) -> None:
    cp = control_plane
    worker = start_worker(queues="default", env={"HF_HUB_OFFLINE": "1"}, extra_args=["--store-root", str(store_root)])
    cp.wait_for_dag("outpost_search")
    run_id = cp.trigger("outpost_search")
    state = cp.wait_for_run("outpost_search", run_id, timeout_s=480)
    assert state == "success", f"{cp.task_states('outpost_search', run_id)}\n{worker.log()[-4000:]}"
    assert cp.xcom("outpost_search", run_id, "embed") == 1
    answer = cp.xcom("outpost_search", run_id, "search")
    assert answer["version"] == "v000001"
    assert "FAISS indexes" in answer["top_text"]  # a note on the topic asked about, found by the index
    assert (store_root / "indexes" / "outpost_search" / "current").resolve().name == "v000001"
