"""Acceptance tests of #24 ("Nothing lost") on the real control plane: the shared secret rotated
while twenty tasks finish, and a 12 MB task log pushed through a link that refuses ~30 % of log
pushes. The MockTransport unit tests of the same behaviours are in ``test_report_delivery.py``."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_outpost.worker.runtime.outbox import Outbox
from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.http_faults import FaultyHttpProxy
from airflow_outpost.worker.testing.worker_process import WorkerProc
from tests.helpers import DAGS

# Slow: about 1.5 minutes each (one starts a control plane of its own); run with -m slow or -m faults.
pytestmark = [pytest.mark.controlplane, pytest.mark.faults, pytest.mark.slow]

TASKS = 20


def _outbox(w: WorkerProc) -> dict:
    return (w.status() or {}).get("outbox") or {}


@pytest.fixture
def rotating_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of its own: the test changes its secret, which the session's must keep. Edge
    jobs that succeeded are kept for an hour, so the test can read the state the worker reported, and
    edge3's orphan check (a running job not updated for ``task_instance_heartbeat_timeout``, which it
    sets to the task instance's state) waits an hour too: only the worker's report can end a job."""
    dags = tmp_path_factory.mktemp("rotation-dags")
    shutil.copy(DAGS / "outpost_rotation.py", dags)
    cp = ControlPlane(dags_folder=dags, home=tmp_path_factory.mktemp("rotation-home"),
                      extra_env={"AIRFLOW__EDGE__JOB_SUCCESS_PURGE": "3600",
                                 "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "3600"})
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.timeout(600)  # a control plane of its own, restarted once, and 20 task starts on a loaded host
def test_secret_rotated_while_twenty_tasks_finish_every_final_state_arrives_once(
        rotating_control_plane: ControlPlane, tmp_path: Path) -> None:
    """What a rotation of the shared ``[api_auth] jwt_secret`` does, in the order an operator does it.

    Task processes present the task tokens the scheduler signed, never the worker's secret, and a
    shared secret has no grace period: a token signed with the old secret is refused (403) once the
    API server has the new one. So the tasks finish first, their own final states accepted by the
    server still on the old secret, and what crosses the rotation is the worker's Edge API reports
    of those jobs: held while the secret file is empty (``printf > file`` truncates before it
    writes), refused (403) while the file already has the new secret and the server not yet, then
    delivered once the API server and the scheduler run with the new secret."""
    cp = rotating_control_plane
    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text(cp.jwt_secret + "\n")
    marker = tmp_path / "m"
    marker.mkdir()
    w = WorkerProc(cp, tmp_path, queues="q_rotate", concurrency=TASKS,
                   extra_args=["--jwt-secret-file", str(secret_file)], env={"OUTPOST_JWT_SECRET": ""}).start()
    try:
        run_id = cp.trigger("outpost_rotation", conf={"marker_dir": str(marker)})
        w.wait_until(lambda: len(list(marker.glob("*.started"))) == TASKS, f"{TASKS} tasks running", 400)
        secret_file.write_text("")
        emptied = time.monotonic()
        (marker / "go").touch()
        w.wait_until(lambda: list(cp.task_states("outpost_rotation", run_id).values()) == ["success"] * TASKS,
              "every task's own final state reaching the server", 180)
        time.sleep(max(0.0, 5 - (time.monotonic() - emptied)))
        w.wait_until(lambda: _outbox(w).get("pending", 0) >= 1 and _outbox(w).get("blocked_by") == "credentials",
              "the final reports held for the empty secret file", 60)
        assert all(j["state"] == "running" for j in cp.edge_jobs("outpost_rotation", run_id))

        new_secret = secrets.token_urlsafe(32)
        secret_file.write_text(new_secret + "\n")  # the worker moves first: the server still has the old one
        w.wait_until(lambda: _outbox(w).get("failures", {}).get("auth", 0) >= 1, "a report refused by the old server", 60)
        rotated_at = time.monotonic()
        cp.rotate_jwt_secret(new_secret)
        w.wait_until(lambda: [j["state"] for j in cp.edge_jobs("outpost_rotation", run_id)] == ["success"] * TASKS,
              "every job's final state from the worker", 180)
        delivered_s = time.monotonic() - rotated_at
        assert cp.wait_for_run("outpost_rotation", run_id, timeout_s=60) == "success"
        tis = cp.task_instances("outpost_rotation", run_id)
        assert sorted((ti["map_index"], ti["state"], ti["try_number"]) for ti in tis) == [
            (i, "success", 1) for i in range(TASKS)]
        jobs = cp.edge_jobs("outpost_rotation", run_id)
        assert sorted((j["map_index"], j["try_number"]) for j in jobs) == [(i, 1) for i in range(TASKS)]
        assert [len((marker / str(i)).read_text().split()) for i in range(TASKS)] == [1] * TASKS
        failures = _outbox(w)["failures"]
        assert failures.get("credentials", 0) >= 1 and failures.get("auth", 0) >= 1, failures  # both faults sent
        w.wait_until(lambda: _outbox(w).get("pending") == 0, "the outbox empty", 60)
    finally:
        assert w.stop() == 0
    box = Outbox(w.state_folder / "outbox.sqlite").open()
    try:
        assert (box.depth, box.dead_letter_count) == (0, 0)  # the offline report too; nothing dead-lettered
    finally:
        box.close()
    print(f"\nRELIABILITY secret-rotation tasks={TASKS} failures={failures} delivered_after_rotation_s={delivered_s:.1f} "
          "lost=0 duplicates=0")


@pytest.mark.timeout(600)
def test_a_12mb_log_arrives_whole_and_in_order_through_a_link_refusing_30_percent_of_pushes(
        control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane
    proxy = FaultyHttpProxy(cp.base_url, fail_rate=0.3, seed=24).start()
    w = WorkerProc(cp, tmp_path, queues="q_noisy", extra_args=["--push-logs", "true"])
    w.argv[w.argv.index("--api-url") + 1] = proxy.url
    try:
        w.start()
        run_id = cp.trigger("outpost_noisy", conf={"lines": 66_000})
        assert cp.wait_for_run("outpost_noisy", run_id, timeout_s=600) == "success"
        # The worker sends the job's final state after the rest of its log (status.json may lag).
        w.wait_until(lambda: [j["state"] for j in cp.edge_jobs("outpost_noisy", run_id)] == ["success"],
              "the job's log and final state delivered", 300)
        [local] = w.log_folder.rglob("attempt=1.log")
        [central] = [p for p in (cp.home / "logs").rglob("attempt=1.log")  # type: ignore[operator]
                     if f"run_id={run_id}" in str(p) and "task_id=shout" in str(p)]
        size = local.stat().st_size
        assert size > 10 * 2**20
        assert proxy.refused >= 5, (proxy.matched, proxy.refused)  # the fault was sent
        central_bytes = central.read_bytes()
        assert len(central_bytes) == size
        assert central_bytes == local.read_bytes()  # whole, in order, nothing twice
        assert _outbox(w)["dead_letters"] == 0
        print(f"\nRELIABILITY flaky-log-pushes log_mb={size / 2**20:.1f} pushes={proxy.matched} "
              f"refused={proxy.refused} lost=0 duplicates=0")
    finally:
        w.stop()
        proxy.stop()
