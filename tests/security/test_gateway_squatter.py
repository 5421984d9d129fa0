"""Another OS user takes the gateway port while no worker runs (issue "Nobody in", item 3).

Under ``crash_policy = adopt`` task processes outlive a crashed worker and keep sending their task
tokens (heartbeats, state changes) to the gateway port they were given. While no worker runs,
another user may bind that port. A task process must then send nothing (its client checks the
listener's uid before each request), and the restarted worker must refuse the port and stop the
task processes instead of adopting them.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from airflow_outpost.worker.processes.gateway_client import CheckedGatewayTransport, checked_client
from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.os_users import OsUser, os_user, user_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates a second OS user (useradd): run as root, as CI does")

# Listens on 127.0.0.1:<port> and prints one JSON line per connection with what it received.
SQUATTER = """
import json, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print(json.dumps("ready"), flush=True)
while True:
    conn, _ = s.accept()
    conn.settimeout(2)
    data = b""
    try:
        while len(data) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    print(json.dumps(data[:4000].decode("latin-1")), flush=True)
    conn.close()
"""


class Squatter:
    """A listener of ``user`` on ``port`` that records every connection it gets."""

    def __init__(self, user: OsUser, port: int) -> None:
        self.received: list[str] = []
        self.proc = subprocess.Popen(
            [user_python(), "-c", SQUATTER, str(port)],
            user=user.uid,
            group=user.gid,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().strip()
        assert ready == '"ready"', (ready, self.proc.stderr.read() if self.proc.stderr else "")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.received.append(json.loads(line))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@contextmanager
def squatting(user: OsUser, port: int) -> Iterator[Squatter]:
    squatter = Squatter(user, port)
    try:
        yield squatter
    finally:
        squatter.stop()


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_the_client_sends_to_the_workers_listener_and_to_nobody_else() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ok)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with httpx.Client(transport=CheckedGatewayTransport(port, os.getuid())) as client:
            assert client.get(f"http://127.0.0.1:{port}/x").text == "ok"
        with httpx.Client(transport=CheckedGatewayTransport(port, os.getuid() + 4242)) as client:
            with pytest.raises(httpx.ConnectError, match=f"uid {os.getuid()} listens there, not the worker"):
                client.get(f"http://127.0.0.1:{port}/x")
    finally:
        server.shutdown()
        server.server_close()
    with httpx.Client(transport=CheckedGatewayTransport(port, os.getuid())) as client:
        with pytest.raises(httpx.ConnectError, match="nothing listens there"):
            client.get(f"http://127.0.0.1:{port}/x")


def test_the_task_sdk_client_of_a_task_refuses_another_users_listener() -> None:
    """The Task SDK client a task process uses sends no token to another user's listener."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with os_user("opsq") as other, squatting(other, port) as squatter:
        client = checked_client(f"http://127.0.0.1:{port}/{'a' * 32}/execution/", "the-task-token", os.getuid())
        try:
            with pytest.raises(httpx.ConnectError, match=f"uid {other.uid} listens there"):
                # send(): the request as its heartbeat builds it, without the Task SDK's retry waits.
                client.send(
                    client.build_request(
                        "PUT", "task-instances/0195d7a6-0000-7000-8000-000000000001/heartbeat", content=b'{"pid": 1, "hostname": "h"}'
                    )
                )
        finally:
            client.close()
        time.sleep(0.5)
        assert squatter.received == []


ADOPT = ["--crash-policy", "adopt", "--prewarm", "1"]


def _wait_until(check, what: str, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return result


def _kill_session(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.controlplane
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_adopted_task_processes_send_no_token_to_a_squatter_and_the_worker_refuses_its_port(
    control_plane: ControlPlane, start_worker, tmp_path: Path
) -> None:
    w = start_worker(queues="q_adopt", extra_args=ADOPT)
    marker = tmp_path / "adopt"
    marker.mkdir()
    run_id = control_plane.trigger("outpost_adopt", conf={"marker_dir": str(marker)})
    _wait_until(lambda: (marker / "started").exists(), f"the task did not start:\n{w.log()[-3000:]}")
    task_pid = int((marker / "started").read_text())
    try:
        port = json.loads((w.state_folder / "gateway.json").read_text())["port"]
        w.send(signal.SIGKILL)
        w.wait(10)
        assert psutil.pid_exists(task_pid), "the task process died with its worker under crash_policy adopt"
        with os_user("opsq") as other, squatting(other, port) as squatter:
            # The task's supervisor heartbeats every second or so (min_heartbeat_interval 1).
            time.sleep(12)
            assert psutil.pid_exists(task_pid)
            assert squatter.received == [], f"a task process sent the squatter: {squatter.received[0][:600]}"
            # The supervisor says why it sent nothing (its heartbeat failed), in the task's output;
            # when depends on the Task SDK's retry backoff and the machine's load, so it is waited for.
            def task_output() -> str:
                outputs = [*w.log_folder.rglob("*"), *(w.state_folder / "task-output").rglob("*")]
                return "".join(p.read_text(errors="replace") for p in outputs if p.is_file())

            _wait_until(lambda: f"uid {other.uid} listens there, not the worker" in task_output(),
                        "the task's supervisor never said why it sent nothing", timeout_s=90)
            assert squatter.received == [], f"a task process sent the squatter: {squatter.received[0][:600]}"
            # The restarted worker finds the port taken by that user: it serves elsewhere and stops
            # the task process rather than adopt it (its try is reported failed).
            w2 = start_worker(queues="q_adopt", name=w.name, state_folder=w.state_folder, extra_args=ADOPT)
            w2.wait_for_log(rf"previous port {port} is held by uid {other.uid}, another user")
            assert control_plane.wait_for_run("outpost_adopt", run_id, timeout_s=120) == "failed", w2.log()[-4000:]
            _wait_until(lambda: not psutil.pid_exists(task_pid), "the task process was not stopped", timeout_s=30)
            assert json.loads((w.state_folder / "gateway.json").read_text())["port"] != port
            assert squatter.received == [], f"something sent the squatter: {squatter.received[0][:600]}"
            assert not (marker / "release").exists()
    finally:
        if psutil.pid_exists(task_pid):
            _kill_session(task_pid)
