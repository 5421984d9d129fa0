"""Start-up failures end with one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from airflow_outpost.worker.edge.versions import task_sdk_api_version
from airflow_outpost.worker.testing.controlplane import ControlPlane, free_port
from airflow_outpost.worker.testing.worker_process import run_outpost


def _assert_one_line_failure(result, fragment: str, code: int = 1) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("outpost: ") and fragment in last, result.stderr


@pytest.fixture
def fake_server() -> Iterator:
    """A loopback HTTP server answering every GET/POST with the configured (status, body)."""
    answer: dict = {"status": 404, "body": {"detail": "Not Found"}, "paths": {}}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            # answer["paths"]: {path: (status, body)} for the paths that answer otherwise.
            status, body = answer["paths"].get(self.path.split("?")[0], (answer["status"], answer["body"]))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _reply

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, answer
    server.shutdown()
    server.server_close()


def _args(url: str, tmp: Path, *extra: str) -> list[str]:
    return ["worker", "--api-url", url, "--name", "w-startup", "--state-folder", str(tmp / "state"),
            "--log-folder", str(tmp / "logs"), "--startup-timeout-s", "2", *extra]


def test_server_down_at_start(tmp_path: Path) -> None:
    result = run_outpost(*_args(f"http://127.0.0.1:{free_port()}", tmp_path), env={"OUTPOST_JWT_SECRET": "x"})
    _assert_one_line_failure(result, "cannot reach the control plane")


def test_wrong_url_is_not_an_airflow_server(tmp_path: Path, fake_server) -> None:
    server, _ = fake_server
    result = run_outpost(*_args(f"http://127.0.0.1:{server.server_port}", tmp_path), env={"OUTPOST_JWT_SECRET": "x"})
    _assert_one_line_failure(result, "does not look like an Airflow 3 API server")


def test_incompatible_server_version(tmp_path: Path, fake_server) -> None:
    server, answer = fake_server
    answer.update(status=200, body={"version": "2.10.5", "git_version": None})
    result = run_outpost(*_args(f"http://127.0.0.1:{server.server_port}", tmp_path), env={"OUTPOST_JWT_SECRET": "x"})
    _assert_one_line_failure(result, "incompatible server version: control plane runs Airflow 2.10.5")


def test_a_task_sdk_newer_than_the_servers_execution_api_is_refused(tmp_path: Path, fake_server) -> None:
    """A control plane of an older line does not serve this Task SDK's Execution API version:
    one line naming both, with the install that fixes it, before anything registers."""
    server, answer = fake_server
    api = task_sdk_api_version()
    assert api is not None
    answer["paths"] = {
        "/api/v2/version": (200, {"version": "3.1.8", "git_version": None}),
        "/execution/openapi.json": (404, {"detail": f"OpenApi file of with version `{api}` not found"}),
    }
    result = run_outpost(*_args(f"http://127.0.0.1:{server.server_port}", tmp_path), env={"OUTPOST_JWT_SECRET": "x"})
    _assert_one_line_failure(result, "control plane runs Airflow 3.1.8, whose Execution API does not serve "
                                     f"version {api} that this worker's Task SDK")
    assert result.stderr.strip().endswith("pip install 'apache-airflow-core==3.1.8'"), result.stderr


def test_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    result = run_outpost(*_args("http://127.0.0.1:1", tmp_path, "--concurrency", "0"))
    _assert_one_line_failure(result, "invalid setting concurrency=0", code=2)


@pytest.mark.controlplane
def test_version_refused_by_real_server(tmp_path: Path, control_plane: ControlPlane) -> None:
    result = run_outpost(*_args(control_plane.base_url, tmp_path, "--edge-provider-version", "1.0.0"),
                         env={"OUTPOST_JWT_SECRET": control_plane.jwt_secret})
    _assert_one_line_failure(result, "refused this worker's versions")
    assert "1.0.0" in result.stderr


@pytest.mark.controlplane
def test_wrong_secret_is_refused(tmp_path: Path, control_plane: ControlPlane) -> None:
    result = run_outpost(*_args(control_plane.base_url, tmp_path), env={"OUTPOST_JWT_SECRET": "not-the-secret" * 5})
    _assert_one_line_failure(result, "refused this worker's credentials (HTTP 403)")


@pytest.mark.controlplane
def test_duplicate_name_and_status_command(tmp_path: Path, control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_unused", name="w-dup")
    result = run_outpost(*_args(control_plane.base_url, tmp_path, "--name", "w-dup"),
                         env={"OUTPOST_JWT_SECRET": control_plane.jwt_secret})
    _assert_one_line_failure(result, "a worker named 'w-dup' is already active")

    status = run_outpost("status", "--state-folder", str(w.state_folder))
    assert status.returncode == 0, status.stderr
    assert "worker w-dup" in status.stdout and "(running)" in status.stdout and "state idle" in status.stdout
    assert "requests/s: idle" in status.stdout
    as_json = json.loads(run_outpost("status", "--json", "--state-folder", str(w.state_folder)).stdout)
    assert as_json["alive"] and as_json["requests_per_s"]["total"] >= 2

    assert w.stop() == 0
    after = run_outpost("status", "--state-folder", str(w.state_folder))
    assert after.returncode == 1 and "NOT running" in after.stdout and "state offline" in after.stdout
