"""Outage faults on the real control plane: the API server killed and restarted while tasks run
and finish, the link to it cut for 60 s, execution tokens that expire in the queue or during a
long task. Each test prints what it measured (pytest -s), for README "Reliability"."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.tcp_proxy import TcpProxy
from airflow_outpost.worker.testing.worker_process import WorkerProc
from tests.helpers import DAGS

pytestmark = [pytest.mark.controlplane, pytest.mark.faults]


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _gateway_back_at(w: WorkerProc) -> float | None:
    """Wall time of the worker's last "gateway: control plane reachable again" log line."""
    found = re.findall(r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d[.,]\d+)(Z?) .*gateway: control plane reachable again",
                       w.log(), re.MULTILINE)
    if not found:
        return None
    stamp, utc = found[-1]
    when = datetime.fromisoformat(stamp.replace(",", "."))
    return when.replace(tzinfo=UTC).timestamp() if utc else when.timestamp()


def test_tasks_finishing_while_the_api_server_is_down_end_with_their_true_state(
        control_plane: ControlPlane, start_worker, tmp_path: Path) -> None:
    cp = control_plane
    w = start_worker(queues="q_outage", concurrency=2)
    marker = tmp_path / "m"
    marker.mkdir()
    run_id = cp.trigger("outpost_outage", conf={"marker_dir": str(marker), "seconds": 25})
    w.wait_until(lambda: (marker / "ok.started").exists() and (marker / "failed.started").exists(), "both tasks starting")
    down_at = time.monotonic()
    cp.kill_api_server()
    # Both tasks finish (their final XCom and state calls are sent) while the server is away.
    w.wait_until(lambda: (marker / "ok.executions").exists() and (marker / "failed.executions").exists(), "tasks finishing")
    time.sleep(max(0.0, 26 - (time.monotonic() - down_at)))
    w.wait_until(lambda: (w.status() or {}).get("disconnected_since") is not None, "status showing the outage", 60)
    cp.start_api_server()
    up_at, up_wall = time.monotonic(), time.time()
    down_s = up_at - down_at
    recover_s = w.wait_until(lambda: (w.status() or {}).get("disconnected_since") is None, "reconnecting", 120)
    assert cp.wait_for_run("outpost_outage", run_id, timeout_s=180) == "failed"  # one task fails on purpose
    tis = {ti["task_id"]: ti for ti in cp.task_instances("outpost_outage", run_id)}
    assert (tis["finishes_ok"]["state"], tis["finishes_ok"]["try_number"]) == ("success", 1)
    assert (tis["finishes_failed"]["state"], tis["finishes_failed"]["try_number"]) == ("failed", 1)
    assert cp.xcom("outpost_outage", run_id, "finishes_ok") == "done"
    assert len(_lines(marker / "ok.executions")) == 1 and len(_lines(marker / "failed.executions")) == 1
    back_at = _gateway_back_at(w)
    assert back_at is not None, w.log()[-5000:]
    gateway_recover_s = back_at - up_wall  # the server answers up to 0.5 s before start_api_server() returns
    w.wait_until(lambda: not list((w.state_folder / "jobs").glob("*.json")), "journal empty", 60)
    assert w.proc.poll() is None
    print(f"\nRELIABILITY api-server-restart down_s={down_s:.1f} gateway_recover_s={gateway_recover_s:.1f} "
          f"worker_recover_s={recover_s:.1f} tasks=2 lost=0 duplicates=0")


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[TcpProxy]:
    p = TcpProxy("127.0.0.1", control_plane.port).start()
    yield p
    p.stop()


# A minute or more of waiting by design: runs with -m slow and in the fault suite (-m faults).
@pytest.mark.slow
def test_link_cut_for_a_minute_worker_rides_it_out_and_recovers_by_itself(
        control_plane: ControlPlane, proxy: TcpProxy, start_worker, tmp_path: Path) -> None:
    # proxy before start_worker: torn down after the worker, which signs off through it.
    cp = control_plane
    w = start_worker(queues="q_linkdrop", extra_args=["--api-url", proxy.url, "--request-timeout-s", "5"])
    pid = w.proc.pid
    marker = tmp_path / "m"
    marker.mkdir()
    run_id = cp.trigger("outpost_linkdrop", conf={"marker_dir": str(marker), "seconds": 30})
    w.wait_until(lambda: (marker / "started").exists(), "the task starting")
    proxy.pause()
    cut_at = time.monotonic()
    detect_s = w.wait_until(lambda: (w.status() or {}).get("disconnected_since") is not None, "status showing disconnected", 60)
    while time.monotonic() - cut_at < 60:
        assert w.proc.poll() is None, w.log()[-5000:]
        time.sleep(1)
    assert (marker / "executions").exists()  # the task finished in the dark
    proxy.resume()
    recover_s = w.wait_until(lambda: (w.status() or {}).get("disconnected_since") is None, "reconnecting", 120)
    assert cp.wait_for_run("outpost_linkdrop", run_id, timeout_s=120) == "success"
    tis = cp.task_instances("outpost_linkdrop", run_id)
    assert [(t["state"], t["try_number"]) for t in tis] == [("success", 1)]
    assert cp.xcom("outpost_linkdrop", run_id, "long_enough") == 7
    assert len(_lines(marker / "executions")) == 1
    assert w.proc.poll() is None and w.proc.pid == pid  # recovered by itself, never exited
    print(f"\nRELIABILITY link-cut cut_s=60 detect_s={detect_s:.1f} worker_recover_s={recover_s:.1f} tasks=1 lost=0 duplicates=0")


@pytest.fixture(scope="module")
def short_token_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A second control plane whose tokens are short-lived: a workload token lives 15 s in the queue,
    an execution token 20 s (the server reissues it on each request in its last 30 s)."""
    cp = ControlPlane(dags_folder=DAGS, home=tmp_path_factory.mktemp("short-token-home"), extra_env={
        "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME": "20",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "15",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "3600",  # let the token expire, not the scheduler act
    })
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


# A minute or more of waiting by design: runs with -m slow and in the fault suite (-m faults).
@pytest.mark.slow
def test_token_expired_in_queue_is_reported_with_the_reason_and_long_tasks_outlive_their_token(
        short_token_plane: ControlPlane, tmp_path: Path) -> None:
    cp = short_token_plane
    marker = tmp_path / "m"
    marker.mkdir()
    conf = {"marker_dir": str(marker)}
    queued = cp.trigger("outpost_token_queued", conf=conf)
    deadline = time.monotonic() + 120
    while cp.task_states("outpost_token_queued", queued).get("quick") != "queued":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(20)  # the workload token (15 s) expires while nobody serves the queue
    w = WorkerProc(cp, tmp_path, queues="q_token_queued,q_token_long", concurrency=2).start()
    try:
        long_run = cp.trigger("outpost_token_long", conf={**conf, "seconds": 30})  # 1.5x its token's life
        assert cp.wait_for_run("outpost_token_queued", queued, timeout_s=180) == "success"
        [ti] = cp.task_instances("outpost_token_queued", queued)
        assert ti["try_number"] == 2  # try 1 was failed for its expired token, try 2 ran
        assert _lines(marker / "executions") == ["2"]  # try 1 never ran
        assert "token expired" in w.log() and "task_queued_timeout" in w.log()
        assert cp.wait_for_run("outpost_token_long", long_run, timeout_s=240) == "success"
        assert cp.xcom("outpost_token_long", long_run, "outlives_its_token") == "still authorised"
    finally:
        w.stop()
    print("\nRELIABILITY token expiry-in-queue reported, retried once; 30 s task with a 20 s token succeeded")
