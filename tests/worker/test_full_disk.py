"""A full state folder degrades the worker, which recovers when space returns (issue #24 item 2).

The worker's state folder is a small tmpfs that fills while its task runs: the task goes on and
succeeds, the worker takes no new job and says why in status.json and /readyz, survives status
writes failing with ENOSPC, and takes work again once the space is freed. Needs root (mount).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _fill(path: Path, leave_bytes: int) -> None:
    """Append to ``path`` until at most ``leave_bytes`` are free on its file system."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            st = os.statvfs(path.parent)
            room = st.f_bavail * st.f_frsize - leave_bytes
            if room <= 0:
                return
            os.write(fd, b"\0" * min(room, 1 << 20))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


# Slow (about 3 minutes): fills and frees a tmpfs while real tasks run.
@pytest.mark.slow
def test_a_full_state_folder_stops_new_work_keeps_running_tasks_and_recovers(control_plane: ControlPlane,
                                                                              start_worker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(state)], check=True)
    port = free_port()
    w = None
    try:
        w = start_worker(queues="q_sleep", state_folder=state, concurrency=4,
                         extra_args=["--metrics-port", str(port), "--heartbeat-interval-s", "1"])

        def readyz() -> tuple[int, str]:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            return r.status_code, r.text

        _wait(lambda: readyz()[0] == 200, 30, "ready")
        first = tmp_path / "first"
        run1 = control_plane.trigger("outpost_sleep", conf={"seconds": 40, "marker_dir": str(first)})
        _wait(lambda: (first / "0.start").exists(), 120, "the first task to start")
        filler = state / "filler"
        _fill(filler, 300 * 1024)  # under the 1 MiB the worker needs
        _wait(lambda: readyz()[0] == 503, 15, "/readyz to say the disk is full")
        code, why = readyz()
        assert "not taking jobs" in why and "KiB free" in why, why
        _wait(lambda: (w.status() or {}).get("degraded"), 15, "status.json to say why")
        assert "KiB free" in w.status()["degraded"]  # type: ignore[index]

        second = tmp_path / "second"
        run2 = control_plane.trigger("outpost_sleep", conf={"seconds": 1, "marker_dir": str(second)})
        _fill(filler, 0)  # now status.json cannot be written at all
        time.sleep(8)
        assert w.proc is not None and w.proc.poll() is None, w.log()[-3000:]
        assert readyz()[0] == 503
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'outpost_worker_loop_errors_total{step="status"}' in metrics, metrics
        # No new work was taken while full; the first task runs on.
        assert control_plane.task_states("outpost_sleep", run2).get("plan") in ("scheduled", "queued"), \
            control_plane.task_states("outpost_sleep", run2)
        assert not (first / "0.end").exists()
        assert control_plane.task_states("outpost_sleep", run1).get("nap[0]") == "running"

        filler.unlink()
        _wait(lambda: readyz()[0] == 200, 30, "/readyz to recover")
        assert control_plane.wait_for_run("outpost_sleep", run1, timeout_s=120) == "success", w.log()[-4000:]
        assert control_plane.wait_for_run("outpost_sleep", run2, timeout_s=120) == "success", w.log()[-4000:]
        assert not w.status().get("degraded")  # type: ignore[union-attr]
        assert "taking jobs again" in w.log()
        assert w.stop() == 0
        assert json.loads((state / "status.json").read_text())["state"] == "offline"
    finally:
        if w is not None and w.proc is not None and w.proc.poll() is None:
            w.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)
