"""The README's first command: `outpost demo` runs the example DAG end to end."""

from __future__ import annotations

import pytest

from airflow_outpost.worker.testing.worker_process import run_outpost

pytestmark = pytest.mark.controlplane


def test_demo_runs_example_dag_to_success() -> None:
    result = run_outpost("demo", timeout_s=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run finished: SUCCESS" in result.stdout
    assert "batch_inference" in result.stdout and "promote" in result.stdout  # the RAG pipeline by default
    assert "'engine': 'ray'" in result.stdout  # its runners on Ray by default
    assert "control plane stopped" in result.stdout


@pytest.mark.slow
def test_demo_runs_the_minimal_example_on_request() -> None:
    result = run_outpost("demo", "--dag", "outpost_example", timeout_s=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "summarize" in result.stdout and "'region': 'demo-local'" in result.stdout


@pytest.mark.slow
def test_demo_runs_the_pipeline_in_the_task_processes_with_engine_local() -> None:
    result = run_outpost("demo", "--engine", "local", timeout_s=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run finished: SUCCESS" in result.stdout and "'engine': 'local'" in result.stdout


def test_demo_engine_is_refused_for_a_dag_without_the_param() -> None:
    result = run_outpost("demo", "--dag", "outpost_example", "--engine", "ray", timeout_s=120)
    assert result.returncode == 2 and "--engine applies to outpost_rag_pipeline only" in result.stderr
