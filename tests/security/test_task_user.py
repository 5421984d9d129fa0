"""Tasks run as another OS user (``--task-user``) cannot reach the worker's secret (issue "Nobody
in", item 4), on the real control plane: the task reads the worker's JWT secret file, its config,
its ledger key and ``/proc/<worker pid>/environ`` and gets PermissionError for each, while XCom
(through the control plane and the region store), Variables, Connections, a local trigger
(``--triggers local``: the task defers and resumes as the task user) and the runners (an embedding
through the worker's model service socket, published in the region store) work as usual.

The task user runs the test's own interpreter (a venv's, as in CI): the ``interpreter_reachable``
fixture lets other users pass through (search only, no listing) the folders above it that are
closed, for the test's duration, and restores their modes after.

And the worker marks itself non-dumpable: a process of the *same* user cannot read its
environment either (tested with a second OS user as both sides, since root may read anything).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.os_users import open_folder, os_group, os_user, user_python
from airflow_outpost.worker.testing.worker_process import WorkerProc

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates OS users (useradd) and runs sudo: run as root, as CI does")
REPO = Path(__file__).resolve().parents[2]


def _sudo() -> str:
    if shutil.which("sudo") is None:
        subprocess.run(["apt-get", "install", "-y", "sudo"], capture_output=True, timeout=300)
    if shutil.which("sudo") is None:
        pytest.skip("sudo is not installed and `apt-get install -y sudo` could not install it")
    return str(shutil.which("sudo"))


@pytest.fixture
def open_root() -> Iterator[Path]:
    with open_folder("outpost-taskuser-") as root:
        yield root


@pytest.fixture
def interpreter_reachable() -> Iterator[None]:
    """The task user runs this interpreter; where it lives in root's home (pyenv, /root 0700), let
    others pass through /root (search only, no listing) for the test, and restore it after."""
    real = Path(os.path.realpath(sys.executable))
    venv = Path(sys.executable).parent  # a venv's bin/ (and the folders above it) may be closed too
    chain = [real, *real.parents, venv, *venv.parents]
    closed = [(p, stat.S_IMODE(p.stat().st_mode)) for p in chain if p.is_dir() and not p.stat().st_mode & stat.S_IXOTH]
    try:
        for p, mode in closed:
            p.chmod(mode | stat.S_IXOTH)
        yield
    finally:
        for p, mode in closed:
            p.chmod(mode)


@pytest.mark.controlplane
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_task_user_cannot_read_the_workers_secret_and_its_dag_still_succeeds(
        control_plane: ControlPlane, open_root: Path, interpreter_reachable: None) -> None:
    _sudo()
    with os_group("optg") as (group, _gid), os_user("optu", groups=(group,)) as task_user:
        etc = open_root / "etc"
        etc.mkdir(mode=0o700)
        secret = etc / "jwt_secret"
        secret.write_text(control_plane.jwt_secret)
        secret.chmod(0o600)
        config = etc / "outpost.toml"
        config.write_text(f'task_user = "{task_user.name}"\nlog_group = "{group}"\njwt_secret_file = "{secret}"\n')
        config.chmod(0o600)
        home = open_root / "task-home"  # the task user's AIRFLOW_HOME
        home.mkdir()
        os.chown(home, task_user.uid, task_user.gid)
        worker = WorkerProc(control_plane, open_root, queues="q_task_user", concurrency=2,
                            extra_args=["--config", str(config), "--triggers", "local"],
                            env={"OUTPOST_JWT_SECRET": "", "AIRFLOW_HOME": str(home),
                                 "AIRFLOW_CONN_OUTPOST_TASK_USER_DB": "postgres://u:p@db.region.internal:5432/x",
                                 "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("worker/src", "runners/src"))})
        worker.start()
        try:
            control_plane.wait_for_dag("outpost_task_user")
            assert worker.proc is not None
            conf = {"secret": str(secret), "config": str(config), "worker_pid": worker.proc.pid,
                    "ledger_key": str(worker.state_folder / "keys" / "ledger.key")}
            run_id = control_plane.trigger("outpost_task_user", conf=conf)
            state = control_plane.wait_for_run("outpost_task_user", run_id, timeout_s=300)
            assert state == "success", (control_plane.task_states("outpost_task_user", run_id), worker.log()[-4000:])
            seen = control_plane.xcom("outpost_task_user", run_id, "check")
            embedded = control_plane.xcom("outpost_task_user", run_id, "embed")
            waited = control_plane.xcom("outpost_task_user", run_id, "wait")
            service = psutil.Process(embedded["service_pid"])
            service_uid, service_parent = service.uids().real, service.ppid()
            worker_log = worker.log()
        finally:
            worker.stop()
        # The runners: the task user's embedding went through the worker's model service (a process of
        # the worker's user, the worker's child) and its vectors were published in the region store.
        assert embedded["uid"] == task_user.uid and embedded["encoder"] == "service", embedded
        assert embedded["embedded"] >= 12 and embedded["dim"] == 384 and embedded["models"] == 1, embedded
        assert embedded["manifest_uid"] == task_user.uid, embedded
        assert (service_uid, service_parent) == (os.getuid(), worker.proc.pid)
        assert (worker.state_folder / "store" / "embeddings" / "task_user").is_dir()
        # A local trigger: the task deferred and resumed as the task user, its trigger ran in the worker.
        assert waited["deferred_uid"] == waited["resumed_uid"] == task_user.uid, waited
        assert "waits on local trigger airflow.providers.standard.triggers.temporal.DateTimeTrigger" in worker_log
        assert "resumed outpost_task_user.wait" in worker_log
        assert seen["uid"] == task_user.uid and seen["check_uid"] == task_user.uid, seen
        assert {k: seen[k] for k in ("secret", "config", "environ", "ledger_key")} == dict.fromkeys(
            ("secret", "config", "environ", "ledger_key"), "PermissionError"), seen
        assert seen["variable"] == "set-by-task-user" and seen["conn_host"] == "db.region.internal", seen
        assert seen["big_len"] == 100_000, seen  # through the region store, written and read by the task user
        # The worker's own files stayed its own: nothing the task user could open was the worker's.
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        for path in worker.state_folder.rglob("*"):
            if path.is_file() and path.stat().st_uid == 0:
                assert not path.stat().st_mode & 0o077 or path.parent.name in ("task-output", "exits"), path


UNDUMPABLE = """
import ctypes, json, os, sys, time
if sys.argv[1] == "1":
    import importlib.util
    spec = importlib.util.spec_from_file_location("procutil", sys.argv[2])
    procutil = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(procutil)
    assert procutil.mark_undumpable()
print(os.getpid(), flush=True)
time.sleep(60)
"""
READ_ENVIRON = """
import json, sys
try:
    open(f"/proc/{sys.argv[1]}/environ", "rb").read()
    print(json.dumps("read"))
except OSError as exc:
    print(json.dumps(type(exc).__name__))
"""


@pytest.mark.parametrize(("undumpable", "expected"), [("0", "read"), ("1", "PermissionError")])
def test_the_worker_is_not_dumpable_so_its_own_user_cannot_read_its_environ(undumpable: str, expected: str,
                                                                             open_root: Path) -> None:
    # mark_undumpable's module alone (standard library only), copied where the other user can load it.
    src = open_root / "procutil.py"
    shutil.copy(REPO / "worker/src/airflow_outpost/worker/procutil.py", src)
    src.chmod(0o644)
    with os_user("optd") as user:
        proc = subprocess.Popen([user_python(), "-c", UNDUMPABLE, undumpable, str(src)], user=user.uid, group=user.gid,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                                env={"PATH": "/usr/bin:/bin", "SECRET_IN_ENV": "s3cret"})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
            time.sleep(0.2)
            assert user.run_python(READ_ENVIRON, line.strip()) == expected
        finally:
            proc.kill()
            proc.wait()
