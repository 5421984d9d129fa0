"""``runners.emit`` against the Task SDK's own outlet-event accessors (no control plane needed;
the event reaching the control plane is checked in test_pipeline_e2e)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk import Asset
from airflow.sdk.execution_time.context import OutletEventAccessors

from airflow_outpost.runners import RunnerError, emit
from airflow_outpost.runners.assets import MAX_EXTRA_BYTES

INDEX = Asset("outpost://index/docs")


def _context(*outlets):
    return {"task": SimpleNamespace(task_id="promote", outlets=list(outlets)), "outlet_events": OutletEventAccessors()}


def test_summary_becomes_the_event_extra():
    ctx = _context(INDEX)
    extra = emit(INDEX, {"version": "v000002", "recall": 0.97, "shape": (10, 384)}, context=ctx)
    assert extra == {"version": "v000002", "recall": 0.97, "shape": [10, 384]}
    assert ctx["outlet_events"][INDEX].extra == extra
    emit("outpost://index/docs", {"count": 12}, context=ctx)  # by URI, merged into the same event
    assert ctx["outlet_events"][INDEX].extra == extra | {"count": 12}


def test_undeclared_asset_is_an_error_not_a_silently_lost_event():
    ctx = _context(Asset("outpost://index/other"))
    with pytest.raises(RunnerError, match=r"does not declare outlets=\[Asset\('outpost://index/docs'\)\]"):
        emit(INDEX, {"version": "v1"}, context=ctx)
    assert len(ctx["outlet_events"]) == 0


def test_oversized_summary_is_refused():
    with pytest.raises(RunnerError, match="not data"):
        emit(INDEX, {"texts": "x" * MAX_EXTRA_BYTES}, context=_context(INDEX))
