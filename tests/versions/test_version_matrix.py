"""The worker against control planes of every supported Airflow line (slow: each line's venv is
built once under build/lines/, then each test starts that line's control plane).

Each line's worker runs from that line's venv (its own Task SDK), as a worker host of that line
installs it; the core end-to-end DAGs run through it: an XCom chain, dynamic mapping, retries, and
a Variable/Connection defined only on the worker; and local triggers: resume, timeout, and a trigger
asking the control plane through the Task SDK's comms (answered where the line's Task SDK can).
The default test run covers 3.3 with the same DAGs (tests/worker/test_controlplane_e2e.py); ``3.3``
here runs them in this venv for the table.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.worker_process import WorkerProc, run_outpost
from tests.helpers import DAGS
from tests.versions.lines import line_python

pytestmark = [pytest.mark.slow, pytest.mark.controlplane]

CORE_DAGS = ("outpost_chain", "outpost_mapped", "outpost_failing", "outpost_secrets")
TRIGGER_FILES = ("outpost_defer", "outpost_triggers")  # local triggers (--triggers local)
# A Variable and a Connection only the control plane has, in its environment: 3.1.8's API server cannot
# store a Variable (500: 'MultiFernet' object has no attribute 'is_encrypted').
CENTRAL_ENV = {"AIRFLOW_VAR_OUTPOST_LINE_VAR": "central", "AIRFLOW_CONN_OUTPOST_LINE_CONN": "generic://carol@central.example"}
WORKER_ENV = {"AIRFLOW_VAR_OUTPOST_LOCAL_VAR": "only-on-the-worker",
              "AIRFLOW_CONN_OUTPOST_LOCAL_DB": "postgres://alice:pw@db.region.local:5433/warehouse"}


def _python(line: str) -> str:
    return sys.executable if line == "3.3" else str(line_python(line))


@pytest.fixture(scope="module")
def line_cp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ControlPlane]]:
    line: str = request.param
    python = _python(line)
    dags = tmp_path_factory.mktemp(f"dags-{line}")
    for dag in (*CORE_DAGS, *TRIGGER_FILES):
        shutil.copy(DAGS / f"{dag}.py", dags / f"{dag}.py")
    cp = ControlPlane(dags_folder=dags, home=tmp_path_factory.mktemp(f"airflow-{line}"), python=python,
                      extra_env=CENTRAL_ENV)
    cp.start(timeout_s=300)
    try:
        yield line, cp
    finally:
        cp.stop()


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("line_cp", ["3.1", "3.2", "3.3"], indirect=True)
def test_core_dags_through_the_worker_of_each_line(line_cp: tuple[str, ControlPlane], tmp_path: Path) -> None:
    line, cp = line_cp
    for dag in CORE_DAGS:
        cp.wait_for_dag(dag, timeout_s=180)
    w = WorkerProc(cp, tmp_path, queues="q_chain,q_mapped,q_failing,q_secrets", concurrency=4, env=WORKER_ENV,
                   python=_python(line)).start()
    try:
        runs = {dag: cp.trigger(dag) for dag in CORE_DAGS}
        states = {dag: cp.wait_for_run(dag, run_id, timeout_s=400) for dag, run_id in runs.items()}
        log = w.log()
        assert states == {"outpost_chain": "success", "outpost_mapped": "success", "outpost_failing": "failed",
                          "outpost_secrets": "success"}, (states, log[-4000:])
        assert cp.xcom("outpost_chain", runs["outpost_chain"], "describe") == "outpost:40"
        assert cp.xcom("outpost_mapped", runs["outpost_mapped"], "total") == sum(x * x for x in range(36))
        [ti] = cp.task_instances("outpost_failing", runs["outpost_failing"])
        assert (ti["state"], ti["try_number"]) == ("failed", 3)
        assert cp.xcom("outpost_secrets", runs["outpost_secrets"], "read") == {
            "var": "only-on-the-worker", "host": "db.region.local", "port": 5433, "login": "alice"}
        assert "ended failed" in log and "Traceback" not in log, log[-4000:]
    finally:
        assert w.stop() == 0, w.log()[-3000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("line_cp", ["3.1", "3.2"], indirect=True)
def test_local_triggers_resume_and_time_out_on_each_line(line_cp: tuple[str, ControlPlane], tmp_path: Path) -> None:
    """The resume replays the try's start (a duplicate start on every line's server) and a timed-out
    trigger fails the task as the line's Task SDK reads ``__fail__`` (BaseSerialization on 3.1)."""
    line, cp = line_cp
    cp.wait_for_dag("outpost_defer", timeout_s=180)
    w = WorkerProc(cp, tmp_path, queues="q_defer", concurrency=2, python=_python(line),
                   extra_args=["--triggers", "local"]).start()
    try:
        ok = cp.trigger("outpost_defer", conf={"kind": "delta", "wait_s": 2})
        timed = cp.trigger("outpost_defer", conf={"kind": "never", "timeout_s": 3})
        assert cp.wait_for_run("outpost_defer", ok, timeout_s=300) == "success", w.log()[-4000:]
        result = cp.xcom("outpost_defer", ok, "wait")
        assert result["try"] == 1 and result["deferred_at"] == 1 and result["before"]["pid"] != result["pid"], result
        assert cp.wait_for_run("outpost_defer", timed, timeout_s=300) == "failed", w.log()[-4000:]
        [log_file] = w.log_folder.glob(f"dag_id=outpost_defer/run_id={timed}/task_id=wait/attempt=1.log")
        text = log_file.read_text(errors="replace")
        assert "TaskDeferralTimeout" in text and "KeyError" not in text, text[-3000:]
    finally:
        assert w.stop() == 0, w.log()[-3000:]


def _answers_trigger_requests(python: str) -> bool:
    """Whether ``python``'s Task SDK ships the request handlers local triggers answer with (1.3 on)."""
    probe = subprocess.run([python, "-c", "import airflow.sdk.execution_time.request_handlers"], capture_output=True,
                           timeout=120)
    return probe.returncode == 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("line_cp", ["3.1", "3.2", "3.3"], indirect=True)
def test_a_local_trigger_asks_the_control_plane_or_fails_clearly_on_each_line(line_cp: tuple[str, ControlPlane],
                                                                               tmp_path: Path) -> None:
    """A trigger reading a Variable and a Connection defined only on the control plane: answered
    through the gateway where the line's Task SDK has the request handlers; elsewhere that trigger
    (not the runner) fails, naming the request and the Task SDK."""
    line, cp = line_cp
    cp.wait_for_dag("outpost_defer", timeout_s=180)
    w = WorkerProc(cp, tmp_path, queues="q_defer", concurrency=2, python=_python(line),
                   extra_args=["--triggers", "local", "--secrets", "local-first"]).start()
    try:
        run = cp.trigger("outpost_defer", conf={"kind": "read", "variable": "outpost_line_var",
                                                "conn_id": "outpost_line_conn"})
        state = cp.wait_for_run("outpost_defer", run, timeout_s=300)
        [log_file] = w.log_folder.glob(f"dag_id=outpost_defer/run_id={run}/task_id=wait/attempt=1.log")
        text = log_file.read_text(errors="replace")
        if _answers_trigger_requests(_python(line)):
            assert state == "success", text[-3000:]
            assert cp.xcom("outpost_defer", run, "wait")["event"] == {"variable": "central", "host": "central.example",
                                                                     "login": "carol"}
        else:
            assert state == "failed", text[-3000:]
            assert "the trigger sent the Task SDK request GetVariable, which this worker's Task SDK" in text, text[-3000:]
            assert "has no handler for" in text and "trigger runner exited" not in w.log(), text[-3000:]
    finally:
        assert w.stop() == 0, w.log()[-3000:]


@pytest.mark.parametrize("line_cp", ["3.1", "3.2"], indirect=True)
def test_a_worker_of_a_newer_line_is_refused_in_one_line(line_cp: tuple[str, ControlPlane], tmp_path: Path) -> None:
    """This venv's Task SDK (3.3's) against an older control plane: refused before registering,
    with the install that fixes it."""
    _, cp = line_cp
    version = cp.version()
    result = run_outpost("worker", "--api-url", cp.base_url, "--name", "w-newer", "--state-folder",
                         str(tmp_path / "state"), "--log-folder", str(tmp_path / "logs"),
                         env={"OUTPOST_JWT_SECRET": cp.jwt_secret}, timeout_s=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"outpost: the control plane runs Airflow {version}, whose Execution API does not serve"), last
    assert last.endswith(f"pip install 'apache-airflow-core=={version}'"), last


@pytest.mark.parametrize("line_cp", ["3.3"], indirect=True)
def test_an_older_lines_worker_is_refused_by_a_default_server_naming_the_setting(
        line_cp: tuple[str, ControlPlane], tmp_path: Path) -> None:
    """A worker of an older line (its Task SDK the server still serves) meets edge3's version check
    on a default-configured 3.3 server: one line with both versions and the server setting."""
    _, cp = line_cp
    older = line_python("3.2")
    started = time.monotonic()
    w = WorkerProc(cp, tmp_path, queues="q_chain", python=str(older))
    w.start(wait_registered=False)
    code = w.wait(timeout_s=120)
    last = w.log().strip().splitlines()[-1]
    assert code == 1 and time.monotonic() - started < 120, w.log()[-3000:]
    assert last.startswith("outpost: the control plane (Airflow 3.3.2) refused this worker's versions (Airflow 3.2.2"), last
    assert "minimum_acceptable_core_version_for_workers = 3.2.2" in last and "apache-airflow-core==3.3.2" in last, last

