"""A job's outcome comes from the task's reported state; the exit code only when none was seen."""

from __future__ import annotations

import pytest

from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.runtime.outcome import outcome


@pytest.mark.parametrize(("task_state", "code", "state", "edge"), [
    ("failed", 0, "failed", "failed"),  # the task runner exits 0 after it reported failed
    ("up_for_retry", 0, "up_for_retry", "up_for_retry"),
    ("success", 0, "success", "success"),
    ("success", 1, "success", "success"),  # the server took the success: that is the try's state
    ("skipped", 0, "skipped", "success"),  # edge3 would never purge a job left "skipped"
    ("deferred", 0, "deferred", "success"),
    ("up_for_reschedule", 0, "up_for_reschedule", "success"),
    (None, 0, "success", "success"),
    (None, 1, "failed", "failed"),
    (None, None, "failed", "failed"),
    ("running", 0, "success", "success"),  # not a final state: the exit code decides
])
def test_outcome(task_state: str | None, code: int | None, state: str, edge: str) -> None:
    result = outcome(task_state, code)
    assert (result.state, result.edge_state) == (state, edge)
    assert result.source == ("task" if task_state not in (None, "running") else "exit code")


def test_recovery_reports_the_state_a_crashed_workers_task_reported() -> None:
    entry = {"key": None, "task_state": "failed"}
    decision = recovery.decide(entry, final_state=None, exit_code=0, alive=False, policy="stop", gateway_url=None)
    assert (decision.action, decision.state) == ("report", "failed") and "reported failed" in decision.reason
    gone = recovery.decide({"task_state": "success"}, final_state=None, exit_code=None, alive=False, policy="stop",
                           gateway_url=None)
    assert (gone.action, gone.state) == ("report", "success")
    unknown = recovery.decide({}, final_state=None, exit_code=None, alive=False, policy="stop", gateway_url=None)
    assert (unknown.action, unknown.state) == ("ask", "failed")  # the control plane is asked; failed if it cannot say
    exited = recovery.decide({}, final_state=None, exit_code=0, alive=False, policy="stop", gateway_url=None)
    assert (exited.action, exited.state) == ("ask", "failed")  # never success from an exit code
