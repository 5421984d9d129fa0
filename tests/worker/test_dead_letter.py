"""A job report the real control plane refuses for good (HTTP 422) lands in the dead-letter table
and in ``outpost status --json``, with the server's reason; it is neither dropped nor retried forever.
The MockTransport test of the same rule is in ``test_report_delivery.py``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from airflow_outpost.worker.edge.jobs import JobKey
from airflow_outpost.worker.runtime.outbox import Outbox
from airflow_outpost.worker.runtime.reports import REJECT_TRIES
from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.worker_process import WorkerProc, run_outpost

pytestmark = [pytest.mark.controlplane, pytest.mark.faults]

# Airflow 2's task state for a try stopped by an operator; Airflow 3 dropped it, so edge3's
# ``TaskInstanceState`` path parameter no longer accepts it.
RETIRED_STATE = "shutdown"


def test_a_report_the_server_answers_422_is_dead_lettered_and_shown_by_outpost_status(control_plane: ControlPlane, tmp_path: Path) -> None:
    """The cause is version skew, the one way a worker's report meets a 422 from edge3 in the field:
    the outbox in the state folder holds a report that another release of the worker queued (a
    rollback, or a state folder restored from a backup) in a state this server does not accept.
    edge3's job-state route takes the state as a ``TaskInstanceState`` path parameter, so FastAPI's
    validation answers 422 before any job is looked up: a refusal that no retry can change. The
    worker replays the row at start, the real API server refuses it ``REJECT_TRIES`` times, and the
    report must then stand in the dead-letter table with that answer, shown by ``outpost status``,
    while the worker keeps running. (Before dead letters, a refused report was acknowledged and
    deleted: nothing would show that a final state never arrived.)"""
    cp = control_plane
    w = WorkerProc(cp, tmp_path, queues="q_dead_letter")
    key = JobKey("outpost_sleep", "nap", "manual__restored", 1, 0)
    box = Outbox(w.state_folder / "outbox.sqlite").open()
    try:
        box.put(key, RETIRED_STATE, "queued by another release")
    finally:
        box.close()

    w.start()
    try:
        t0 = time.monotonic()
        while True:
            shown = json.loads(run_outpost("status", "--json", "--state-folder", str(w.state_folder)).stdout)
            outbox = shown.get("outbox") or {}
            if outbox.get("dead_letters"):
                break
            assert time.monotonic() - t0 < 90, f"not dead-lettered within 90 s: {outbox}\n{w.log()[-4000:]}"
            assert w.proc is not None and w.proc.poll() is None, w.log()[-4000:]
            time.sleep(1)
        assert outbox["pending"] == 0
        [dead] = outbox["dead_letter_recent"]
        assert dead["state"] == RETIRED_STATE
        assert dead["subject"] == key.as_dict()
        # The reason is the real server's answer: the status and edge3's validation of the state.
        assert "HTTP 422" in dead["reason"] and f"/{RETIRED_STATE}" in dead["reason"], dead["reason"]
        assert "Input should be" in dead["reason"], dead["reason"]
        assert w.log().count(f"refused the report {json.dumps(key.as_dict(), sort_keys=True)} {RETIRED_STATE} {REJECT_TRIES} times") == 1
        human = run_outpost("status", "--state-folder", str(w.state_folder)).stdout
        assert "1 dead-lettered" in human and "HTTP 422" in human, human
        assert w.proc is not None and w.proc.poll() is None  # the worker runs on
    finally:
        assert w.stop() == 0
    box = Outbox(w.state_folder / "outbox.sqlite").open()
    try:
        assert (box.depth, box.dead_letter_count) == (0, 1)  # kept across the worker's exit, not dropped
    finally:
        box.close()
