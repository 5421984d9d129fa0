"""The worker's files as another local user sees them (issue "Nobody in", item 3).

Each test puts the worker's folders under a folder every user may enter, so what decides access is
the modes the worker gives its own files, not a private temp folder around them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_outpost.runners.errors import ModelServiceError
from airflow_outpost.runners.model_service import client as model_client
from airflow_outpost.runners.model_service.protocol import private_dir
from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.os_users import open_folder, os_group, os_user, user_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates OS users (useradd): run as root, as CI does")

# Run as the other user: every file and folder under the given roots, and what opening it gave.
PROBE = """
import json, os, socket, stat, sys
seen = {}
for root in sys.argv[1:]:
    for path in [root] + [os.path.join(d, n) for d, ds, fs in os.walk(root) for n in ds + fs]:
        try:
            st = os.lstat(path)
        except OSError as exc:
            seen[path] = "stat:" + type(exc).__name__
            continue
        try:
            if stat.S_ISDIR(st.st_mode):
                os.listdir(path)
            elif stat.S_ISSOCK(st.st_mode):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            else:
                open(path, "rb").read(1)
            seen[path] = "read"
        except OSError as exc:
            seen[path] = type(exc).__name__
print(json.dumps(seen))
"""


@pytest.fixture
def open_root() -> Iterator[Path]:
    with open_folder("outpost-modes-") as root:
        yield root


def _all_paths(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_another_user_can_read_nothing_of_the_worker_after_a_dag_run(control_plane: ControlPlane, start_worker,
                                                                     open_root: Path) -> None:
    state, logs = open_root / "state", open_root / "logs"
    w = start_worker(queues="q_chain", state_folder=state, extra_args=["--log-folder", str(logs)])
    run_id = control_plane.trigger("outpost_chain")
    assert control_plane.wait_for_run("outpost_chain", run_id, timeout_s=180) == "success"
    kinds = {p.name for p in _all_paths(state)}
    # What a reviewer found world-readable before: the outbox, the egress ledger, the journal, logs.
    assert {"outbox.sqlite", "status.json"} <= kinds, kinds
    assert any(p.suffix == ".log" for p in logs.rglob("*")), list(logs.rglob("*"))
    with os_user() as other:
        seen = other.run_python(PROBE, str(state), str(logs))
    # The folders themselves refuse a listing; nothing below is even reachable.
    assert seen[str(state)] == "PermissionError" and seen[str(logs)] == "PermissionError", seen
    assert set(seen) == {str(state), str(logs)}, seen
    # And the modes say why: state 0700 and the worker's own files 0600 (what task processes write
    # there, 0640, is shut in by the folder); logs 0750 / 0640 (group: the worker's).
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for p in _all_paths(state):
        assert stat.S_IMODE(p.stat().st_mode) & 0o007 == 0, (p, oct(p.stat().st_mode))
    for p in state.glob("*.sqlite"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    for p in _all_paths(logs):
        assert stat.S_IMODE(p.stat().st_mode) & 0o027 == 0, (p, oct(p.stat().st_mode))
    w.stop()


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_log_group_may_read_task_logs_but_not_the_state(control_plane: ControlPlane, start_worker,
                                                        open_root: Path) -> None:
    state, logs = open_root / "state", open_root / "logs"
    with os_group() as (group, gid), os_user(groups=(group,)) as shipper, os_user() as other:
        start_worker(queues="q_chain", state_folder=state, extra_args=["--log-folder", str(logs), "--log-group", group])
        run_id = control_plane.trigger("outpost_chain")
        assert control_plane.wait_for_run("outpost_chain", run_id, timeout_s=180) == "success"
        task_logs = [p for p in logs.rglob("*") if p.is_file()]
        assert task_logs
        for p in _all_paths(logs):
            st = p.stat()
            assert st.st_gid == gid, (p, st.st_gid)
            assert stat.S_IMODE(st.st_mode) & 0o007 == 0, (p, oct(st.st_mode))
        shipped = shipper.run_python(PROBE, str(logs), str(state))
        assert all(shipped[str(p)] == "read" for p in _all_paths(logs)), shipped
        assert shipped[str(state)] == "PermissionError"
        assert other.run_python(PROBE, str(logs))[str(logs)] == "PermissionError"


def test_log_group_that_does_not_exist_is_a_setting_error() -> None:
    from airflow_outpost.worker.config import load_settings
    from airflow_outpost.worker.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_settings({"api_url": "http://127.0.0.1:9", "log_group": "no-such-group-xyz"}, env={})
    assert "log_group" in str(err.value) and "no-such-group-xyz" in str(err.value) and "exists on this host" in str(err.value)


def test_a_socket_another_user_listens_on_is_refused_not_talked_to(open_root: Path) -> None:
    """Squatting: another user binds the path the client would use; the client refuses to send."""
    path = open_root / "squat.sock"
    open_root.chmod(0o1777)
    with os_user() as other:
        listener = (
            "import json, os, socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777); s.listen(1)\n"
            "print(json.dumps('ready'), flush=True)\n"
            "s.settimeout(30)\n"
            "conns = []\n"
            "while True:\n    try:\n        conns.append(s.accept()[0])\n    except OSError:\n        break\n"
        )
        proc = subprocess.Popen([user_python(), "-c", listener, str(path)], user=other.uid, group=other.gid,
                                stdout=subprocess.PIPE, text=True, cwd="/")
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == '"ready"'
            with pytest.raises(ModelServiceError) as err:
                model_client._connect(path, 5.0)
            assert f"uid {other.uid}" in str(err.value) and "refusing to send it data" in str(err.value)
            client = model_client.ModelClient(path, autostart=True)
            with pytest.raises(ModelServiceError):
                client.stats()
        finally:
            proc.kill()
            proc.wait(10)


def test_the_fallback_socket_folder_another_user_made_first_is_refused(open_root: Path) -> None:
    squatted = open_root / "taken"
    squatted.mkdir(mode=0o777)
    with os_user() as other:
        os.chown(squatted, other.uid, other.gid)
        with pytest.raises(ModelServiceError) as err:
            private_dir(squatted)
        assert f"owned by uid {other.uid}" in str(err.value)
    mine = private_dir(open_root / "mine")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700 and mine.stat().st_uid == os.getuid()
    loose = open_root / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(ModelServiceError):
        private_dir(loose)


def test_the_worker_model_socket_fallback_is_a_fresh_private_folder(tmp_path: Path) -> None:
    from airflow_outpost.worker.hosted.model_host import socket_path_for

    deep = tmp_path / ("d" * 120)
    path = socket_path_for(deep)
    try:
        assert path.parent != Path(tempfile.gettempdir())
        st = path.parent.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert socket_path_for(deep) != path  # random per run, so nobody can take it first
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
