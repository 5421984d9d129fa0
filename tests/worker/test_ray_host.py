"""The Ray the worker gives its tasks (worker/ray_host.py), against real Ray on loopback.

A driver here is what a task does: a separate Python process that has nothing but the variables
the worker exports (``RayHost.task_env()``), calls ``RayConfig.from_env()`` and enters
``airflow_outpost.runners.batch.ray_session.ray_session``. The head runs in an event loop on a helper thread, as it
runs in the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_outpost.worker.hosted.ray_host import MARKER_ENV, RayHost, marked_pids, temp_dir_for
from airflow_outpost.worker.runtime.state import StateFolder
from airflow_outpost.worker.testing.worker_process import run_outpost
from tests.helpers import REPO

pytest.importorskip("ray")

# A task's view: only the worker's Ray variables (plus what any process needs) reach the driver.
_DRIVER = r"""
import json, os, sys
import ray
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

name = sys.argv[1]
with ray_session(RayConfig.from_env(num_cpus=1)) as info:
    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def visit(self):
            self.n += 1
            return self.n, os.getpid()

    try:
        counter, made = ray.get_actor(name, namespace="outpost-tests"), False
    except ValueError:
        counter, made = Counter.options(name=name, namespace="outpost-tests", lifetime="detached").remote(), True
    visits, actor_pid = ray.get(counter.visit.remote())
    print(json.dumps({"address": info["address"], "started": info["started"], "square": ray.get(square.remote(7)),
                      "made": made, "visits": visits, "actor_pid": actor_pid}))
"""


class LoopThread:
    """An asyncio loop on its own thread, like the worker's, driven from synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ray-host-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _base_env() -> dict[str, str]:
    """What the worker would give Ray's processes: its environment without other Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OUTPOST_RAY"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _drive(host: RayHost, actor: str, timeout_s: float = 120) -> dict[str, Any]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(host.task_env(), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, actor], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, f"driver failed:\n{proc.stderr[-3000:]}\n{host._log_tail()}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


def _pids_naming(temp_dir: Path) -> list[int]:
    """Processes whose command line names ``temp_dir`` (independent of RayHost's own bookkeeping)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def head(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHost]:
    host = RayHost("local", tmp_path_factory.mktemp("state"), keep_warm_s=42, num_cpus=1)
    try:
        loop_thread.run(host.start(_base_env()))
        assert loop_thread.run(host.wait_ready()), host._log_tail()
        yield host
    finally:
        loop_thread.run(host.aclose())


@pytest.mark.timeout(240)
def test_a_task_joins_the_worker_ray_with_only_the_exported_env(head: RayHost) -> None:
    env = head.task_env()
    assert env == {"OUTPOST_RAY_ADDRESS": f"127.0.0.1:{head.port}", "OUTPOST_RAY_KEEP_WARM_S": "42",
                   "RAY_AUTH_TOKEN_PATH": str((head.folder / "auth_token").resolve())}
    result = _drive(head, f"joins-{uuid.uuid4().hex[:6]}")
    assert result["address"] == env["OUTPOST_RAY_ADDRESS"] and result["started"] is False  # joined, not started
    assert result["square"] == 49


@pytest.mark.timeout(240)
def test_a_detached_actor_outlives_the_task_that_made_it(head: RayHost) -> None:
    name = f"warm-{uuid.uuid4().hex[:6]}"
    first = _drive(head, name)
    second = _drive(head, name)
    assert (first["made"], first["visits"]) == (True, 1)
    # The second task found the same live actor, state and process: warm across tasks.
    assert (second["made"], second["visits"], second["actor_pid"]) == (False, 2, first["actor_pid"])


@pytest.mark.timeout(300)
def test_a_dead_head_is_restarted_and_tasks_do_without_it_meanwhile(head: RayHost) -> None:
    before = _drive(head, f"doomed-{uuid.uuid4().hex[:6]}")
    restarts, address = head.restarts, head.address
    assert head._proc is not None
    os.killpg(head._proc.pid, signal.SIGKILL)  # the head and its group die at once, as in an OOM kill
    _wait(lambda: head.up is False, 30, "the worker to notice the head died")
    assert head.task_env() == {}  # a task starting now starts its own Ray instead of failing to reach ours
    _wait(lambda: head.up and head.restarts == restarts + 1, 120, f"a restarted head:\n{head._log_tail()}")
    assert head.address == address  # the same port again: tasks that still hold the address reach it
    # Ray's worker processes leave the head's process group; the actor's must not outlive its head.
    assert not _alive(before["actor_pid"])
    after = _drive(head, f"reborn-{uuid.uuid4().hex[:6]}")
    assert after["square"] == 49 and after["made"] is True


@pytest.mark.timeout(300)
def test_aclose_leaves_no_process_of_that_ray_and_the_token_private(loop_thread: LoopThread, tmp_path: Path) -> None:
    host = RayHost("local", tmp_path / "state", keep_warm_s=600, num_cpus=1)
    try:
        loop_thread.run(host.start(_base_env()))
        assert loop_thread.run(host.wait_ready()), host._log_tail()
        actor_pid = _drive(host, "lingering")["actor_pid"]  # a detached actor: a process outside the group
        assert _pids_naming(host.temp_dir) and actor_pid in marked_pids(host.temp_dir)
    finally:
        loop_thread.run(host.aclose())
    loop_thread.run(host.aclose())  # safe twice
    assert _pids_naming(host.temp_dir) == [] and marked_pids(host.temp_dir) == []
    assert not _alive(actor_pid)
    assert not host.temp_dir.exists()
    token = host.folder / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    assert stat.S_IMODE(host.folder.stat().st_mode) == 0o700
    assert host.up is False and host.task_env() == {}


@pytest.mark.timeout(120)
def test_a_head_that_does_not_come_up_leaves_tasks_on_their_own_ray(
        loop_thread: LoopThread, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = RayHost("local", tmp_path / "state", keep_warm_s=600, num_cpus=1, start_timeout_s=0.3)
    # Left by a previous run of this worker that was killed: marked as this head's, so it is stopped.
    leftover = subprocess.Popen(["sleep", "300"], env={**os.environ, MARKER_ENV: str(host.temp_dir)})
    with caplog.at_level(logging.WARNING, logger="airflow_outpost.worker.hosted.ray_host"):
        try:
            loop_thread.run(host.start(_base_env()))
            assert loop_thread.run(host.wait_ready(timeout_s=30)) is False
            assert host.task_env() == {}
            assert leftover.wait(timeout=5) == -signal.SIGKILL
        finally:
            loop_thread.run(host.aclose())
            if leftover.poll() is None:
                leftover.kill()
    assert str(host.log_path) in caplog.text and "start their own Ray" in caplog.text
    assert "leftover process(es)" in caplog.text
    assert marked_pids(host.temp_dir) == []


# A driver on the head's cluster: waits until ``sys.argv[1]`` nodes are alive and lists them.
_NODES = r"""
import json, sys, time
import ray
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

with ray_session(RayConfig.from_env()):
    deadline = time.time() + 90
    while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[1]) and time.time() < deadline:
        time.sleep(0.5)
    print(json.dumps({"nodes": [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU")}
                                for n in ray.nodes() if n["Alive"]],
                      "head": ray.get_runtime_context().gcs_address}))
"""


@pytest.mark.timeout(300)
def test_another_node_joins_the_head_at_its_node_ip_address(loop_thread: LoopThread, tmp_path: Path) -> None:
    from airflow_outpost.worker.config import load_settings

    settings = load_settings({"api_url": "http://h", "ray": "local", "ray_num_cpus": "1",
                              "ray_node_ip_address": "127.0.0.1", "state_folder": str(tmp_path / "state")}, env={})
    host = RayHost.from_settings(settings)
    assert host is not None and host.node_ip_address == "127.0.0.1"
    joined: subprocess.Popen[bytes] | None = None
    try:
        loop_thread.run(host.start(_base_env()))
        assert loop_thread.run(host.wait_ready()), host._log_tail()
        assert host.address == f"127.0.0.1:{host.port}"
        # README's join command on "another host": the head's address and its token, this node's own IP.
        token = (host.folder / "auth_token").read_text().strip()
        with open(tmp_path / "joined.log", "wb") as out:
            joined = subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "start", "--address", str(host.address),
                 "--node-ip-address=127.0.0.1", "--num-cpus=1", "--block", "--disable-usage-stats"],
                env={**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        env.update(host.task_env(), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, "-c", _NODES, "2"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=180, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        log_tail = (tmp_path / "joined.log").read_text(errors="replace")[-2000:]
        assert len(seen["nodes"]) == 2, (seen, log_tail)  # the head and the node that joined it
        assert len({n["id"] for n in seen["nodes"]}) == 2 and sum(n["cpus"] for n in seen["nodes"]) == 2
        assert seen["head"].endswith(f":{host.port}") and joined.poll() is None
    finally:
        if joined is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(joined.pid, signal.SIGTERM)
            try:
                joined.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(joined.pid, signal.SIGKILL)
                joined.wait()
        loop_thread.run(host.aclose())
    # The joined node ran under the head's temp dir: nothing of either is left.
    assert _pids_naming(host.temp_dir) == [] and marked_pids(host.temp_dir) == []


def test_an_existing_cluster_is_passed_to_tasks_and_probed(loop_thread: LoopThread, tmp_path: Path) -> None:
    token = tmp_path / "cluster-token"
    token.write_text("t0ken\n")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        host = RayHost(address, tmp_path / "state", keep_warm_s=90.5, auth_token_file=token)
        env = {"OUTPOST_RAY_ADDRESS": "elsewhere:1", "RAY_AUTH_TOKEN": "kept for the cluster"}
        host.scrub(env)
        assert env == {"RAY_AUTH_TOKEN": "kept for the cluster"}
        loop_thread.run(host.start({}))
        assert loop_thread.run(host.wait_ready(timeout_s=10)) is True
        assert host.up is True and host.describe()["mode"] == "cluster"
        assert host.task_env() == {"OUTPOST_RAY_ADDRESS": address, "OUTPOST_RAY_KEEP_WARM_S": "90.5",
                                   "RAY_AUTH_TOKEN_PATH": str(token.resolve())}
    loop_thread.run(host.aclose())
    closed = RayHost(address, tmp_path / "state2", keep_warm_s=1)  # nothing listens there now
    loop_thread.run(closed.start({}))
    assert loop_thread.run(closed.wait_ready(timeout_s=10)) is True  # a cluster is never waited for
    assert closed.up is False and closed.task_env()["OUTPOST_RAY_ADDRESS"] == address  # tasks get a clear error
    loop_thread.run(closed.aclose())
    assert not (tmp_path / "state" / "ray").exists()  # nothing started, nothing written


def test_local_mode_scrubs_other_ray_settings_from_tasks(tmp_path: Path) -> None:
    host = RayHost("local", tmp_path, keep_warm_s=1)
    env = {"RAY_AUTH_TOKEN": "someone else's", "RAY_AUTH_TOKEN_PATH": "/x", "RAY_ADDRESS": "h:1",
           "OUTPOST_RAY_ADDRESS": "h:2", "OUTPOST_RAY_KEEP_WARM_S": "5", "PATH": "/bin"}
    host.scrub(env)
    assert env == {"PATH": "/bin"}
    assert host.task_env() == {}  # not started: tasks start their own Ray
    assert len(str(temp_dir_for(tmp_path / ("deep" * 40)))) <= 40  # Ray's socket paths fit below it


def test_outpost_status_shows_the_ray(tmp_path: Path) -> None:
    status = {"pid": os.getpid(), "name": "w1", "api_url": "http://h", "state": "idle", "updated": time.time(),
              "concurrency": 2, "free_slots": 2, "queues": None, "requests_per_s": {}, "jobs": [],
              "ray": {"mode": "local", "address": "127.0.0.1:6380", "up": False, "restarts": 2, "log": "x"}}
    folder = StateFolder(tmp_path)
    folder.acquire()  # as the worker that wrote status.json does: `outpost status` asks who holds the lock
    (tmp_path / "status.json").write_text(json.dumps(status))
    try:
        result = run_outpost("status", "--state-folder", str(tmp_path))
    finally:
        folder.release()
    assert result.returncode == 0, result.stderr
    assert "ray 127.0.0.1:6380 (local head owned by the worker): DOWN (tasks start their own Ray), restarted 2" \
        in result.stdout


def test_metrics_say_where_the_ray_is_and_whether_it_answers(tmp_path: Path) -> None:
    from airflow_outpost.worker.observability.prometheus import WorkerMetrics, WorkerSnapshot

    host = RayHost("10.0.0.5:6379", tmp_path, keep_warm_s=1)
    host.up, host.restarts = False, 3
    snapshot = WorkerSnapshot(state="idle", reachable=True, concurrency=1, free_slots=1, running_queues=(), live=(),
                              outbox_depth=0, requests_total=0, request_rates={}, gpus_total=0, gpus_free=0,
                              gpu_devices=(), ray=host.describe())
    text = WorkerMetrics(lambda: snapshot).render().decode()
    assert 'outpost_ray_up{address="10.0.0.5:6379",mode="cluster"} 0.0' in text
    assert "outpost_ray_restarts_total 3.0" in text

@pytest.mark.slow
@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_a_worker_with_ray_local_keeps_an_actor_warm_across_its_tasks(control_plane, start_worker) -> None:
    w = start_worker(queues="q_ray", concurrency=1,
                     extra_args=["--ray", "local", "--ray-num-cpus", "1", "--ray-keep-warm-s", "90"])
    _wait(lambda: (w.status() or {}).get("ray", {}).get("up"), 120, f"the worker's Ray:\n{w.log()[-3000:]}")
    address = w.status()["ray"]["address"]
    run_id = control_plane.trigger("outpost_ray_warm")
    assert control_plane.wait_for_run("outpost_ray_warm", run_id, timeout_s=300) == "success", \
        (control_plane.task_states("outpost_ray_warm", run_id), w.log()[-5000:])
    first = control_plane.xcom("outpost_ray_warm", run_id, "first")
    second = control_plane.xcom("outpost_ray_warm", run_id, "second")
    assert (first["address"], first["started"], first["made"], first["keep_warm_s"]) == (address, False, True, "90")
    assert (second["made"], second["visits"], second["actor_pid"]) == (False, 2, first["actor_pid"])
    temp_dir = temp_dir_for(w.state_folder)
    assert w.stop() == 0
    assert marked_pids(temp_dir) == [] and not _alive(first["actor_pid"])
