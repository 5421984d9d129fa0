"""The example RAG pipeline end to end: real control plane, real worker, real model, FAISS and Ray.

On both engines (the DAG's ``engine`` param): ``ray`` (the default, what ``outpost demo`` runs)
embeds, builds and retrieves on a Ray of each task's own; ``local`` runs them in the task
processes, where the embedding tasks share one model load in the worker's model service.
The promotion's asset event (with the summary as extra) is read back from the control plane's
REST API and must have triggered the consumer DAG.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from airflow_outpost.runners import ModelClient
from airflow_outpost.runners.model_service.client import ping
from airflow_outpost.worker.hosted.model_host import socket_path_for

pytestmark = [pytest.mark.controlplane, pytest.mark.timeout(900)]

DAG = "outpost_rag_pipeline"
CONSUMER = "outpost_rag_consumer"


@pytest.fixture
def store_root() -> Path:
    # Short: the model service's socket lives here and UNIX socket paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rag-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _consumer_runs(cp) -> list[dict]:
    return cp._json("GET", f"/dags/{CONSUMER}/dagRuns", params={"limit": 100})["dag_runs"]


@pytest.mark.parametrize("engine", ["ray", pytest.param("local", marks=pytest.mark.slow)])
def test_rag_pipeline_runs_end_to_end_and_promotion_triggers_the_consumer(control_plane, start_worker, store_root,
                                                                         engine):
    cp = control_plane
    worker = start_worker(queues="default", env={"HF_HUB_OFFLINE": "1"},
                          extra_args=["--store-root", str(store_root)])
    model_service = socket_path_for(worker.state_folder)  # the worker's own model service
    cp.wait_for_dag(CONSUMER)
    consumers_before = {r["dag_run_id"] for r in _consumer_runs(cp)}
    run_id = cp.trigger(DAG, conf={"documents": 120, "engine": engine})
    state = cp.wait_for_run(DAG, run_id, timeout_s=600)
    assert state == "success", f"{cp.task_states(DAG, run_id)}\n{worker.log()[-4000:]}"

    arrived = cp.xcom(DAG, run_id, "documents_arrive")
    embedded = cp.xcom(DAG, run_id, "embed")
    promoted = cp.xcom(DAG, run_id, "promote")
    inferred = cp.xcom(DAG, run_id, "batch_inference")
    assert arrived["documents"] == 120 and arrived["corpus_uri"].startswith(f"file://{store_root}")
    built = cp.xcom(DAG, run_id, "build_index")
    assert embedded["changed"] and embedded["chunks"] >= 120
    assert promoted["version"] == "v000001" and promoted["recall"] >= 0.9
    assert inferred["rows"] == 10 and inferred["top1_topic_accuracy"] >= 0.8
    if engine == "ray":
        assert (embedded["engine"], built["engine"], inferred["engine"]) == ("ray", "ray", "ray")
    else:
        assert (embedded["engine"], built["engine"], inferred["engine"]) == ("local", "local", "local")
        assert embedded["encoder"] == "service"
    assert (store_root / "indexes" / "rag_docs" / "current").resolve().name == promoted["version"]
    # XCom holds metadata only: no texts, no vectors.
    assert all(len(repr(x)) < 2000 for x in (arrived, embedded, promoted, inferred))

    events = cp._json("GET", "/assets/events", params={"source_dag_id": DAG, "source_run_id": run_id})["asset_events"]
    assert [e["uri"] for e in events] == ["outpost://index/rag_docs"]
    assert events[0]["source_task_id"] == "promote" and events[0]["extra"] == promoted

    # The event schedules the consumer DAG, which reads the summary from the event.
    deadline = time.monotonic() + 240
    new: list[dict] = []
    while time.monotonic() < deadline:
        new = [r for r in _consumer_runs(cp) if r["dag_run_id"] not in consumers_before]
        if new and new[0]["state"] in ("success", "failed"):
            break
        time.sleep(1)
    assert new and new[0]["state"] == "success", new
    assert cp.xcom(CONSUMER, new[0]["dag_run_id"], "announce")["version"] == promoted["version"]

    if engine == "local":
        # embed and batch_inference ran in different processes; the model was loaded once, in the
        # service the worker started (and stops: see below).
        stats = ModelClient(model_service, autostart=False).stats()
        assert stats["loads"] == 1
        [held] = stats["models"]
        assert held["calls"] >= 2 and held["texts"] >= embedded["embedded"] + 10

    assert worker.stop() == 0
    assert ping(model_service) is None and not model_service.exists()
