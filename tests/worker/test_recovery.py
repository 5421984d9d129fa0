"""Crash recovery without a control plane: exit records, the journal, the recovery decision,
adopted processes watched by pid, and the gateway port kept across restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.jobs import JobKey
from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.egress.gateway_file import GatewayRecord, read_record, save_record
from airflow_outpost.worker.hosted.gpu import GpuAllocator
from airflow_outpost.worker.processes import task_main as task_process
from airflow_outpost.worker.runtime.recovery import (
    AdoptedProcess,
    decide,
    is_our_process,
    job_from_entry,
    process_start_time,
    stop_process_tree,
)
from airflow_outpost.worker.runtime.state import StateFolder, read_exit, record_exit

KEY = JobKey("d", "t", "r", 1, -1, None)
GATEWAY = "http://127.0.0.1:40001/0123456789abcdef0123456789abcdef/execution/"
ENTRY = {"key": KEY, "pid": 4242, "create_time": 1.0, "output": "/s/task-output/task-x.out", "server": GATEWAY,
         "queue": "default", "slots": 2, "log_path": "d/r/t/1.log", "dag_rel_path": "d.py",
         "ti_id": "0190f0f0-0000-7000-8000-000000000001", "devices": ["1"]}
# Named like a task process (the worker adopts only its own processes), but only sleeps; it
# records exit code 3 when told to by SIGUSR1 and exits, like a task process whose task failed.
FAKE_TASK = """
import signal, sys, time
from setproctitle import setproctitle
from airflow_outpost.worker.runtime.state import record_exit
setproctitle("outpost task: d.t run=r map=-1 try=1")  # as a real task process does
def done(*_):
    record_exit(sys.argv[1], 3)
    sys.exit(3)
signal.signal(signal.SIGUSR1, done)
print("ready", flush=True)
time.sleep(120)
"""


def _fake_task(exit_file: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TASK, str(exit_file), "airflow_outpost.worker.processes.task_main"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


# -- exit records and the journal ---------------------------------------------------------------
def test_exit_record_round_trip_and_unreadable_records(tmp_path: Path) -> None:
    path = tmp_path / "exits" / "a.json"
    assert read_exit(path) is None
    record_exit(path, 0)
    assert read_exit(path) == 0
    record_exit(path, -9)  # replaced whole, never appended to
    assert read_exit(path) == -9 and json.loads(path.read_text())["pid"] == os.getpid()
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left behind
    for bad in ("", "{", '{"code": "0"}', '{"code": true}', "[]"):
        path.write_text(bad)
        assert read_exit(path) is None, bad  # unknown outcome: never read as success


def test_task_process_records_its_exit_code_where_the_request_says(tmp_path: Path) -> None:
    target = tmp_path / "exits" / "x.json"
    task_process._record_exit({"exit_file": str(target)}, 1)
    assert read_exit(target) == 1
    task_process._record_exit({"exit_file": None}, 0)  # no exit file asked for: nothing written
    assert list(target.parent.iterdir()) == [target]


def test_the_journal_syncs_what_a_restart_needs_and_not_the_claim_it_rewrites_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = StateFolder(tmp_path / "state")
    folder.acquire()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    try:
        folder.journal_start(KEY, None)  # the claim, rewritten with the pid right after
        assert synced == [] and folder.journal_leftovers()[0]["pid"] is None
        folder.journal_start(KEY, 77)  # what a restart adopts or reports: file and folder synced
        assert len(synced) == 2
        assert folder.journal_update(KEY, task_state="success")  # a finished task's state
        assert len(synced) == 4
        folder.write_status({"state": "idle"})  # only informs `outpost status`
        assert len(synced) == 4 and folder.read_status() == {"state": "idle"}
        folder.journal_done(KEY)
    finally:
        folder.release()


def test_journal_keeps_adoption_details_and_drops_the_exit_record_with_the_entry(tmp_path: Path) -> None:
    folder = StateFolder(tmp_path / "state")
    folder.acquire()
    try:
        record_exit(folder.exit_file(KEY), 0)  # left by an earlier attempt of the same key
        folder.journal_start(KEY, None)
        assert read_exit(folder.exit_file(KEY)) is None  # a fresh claim has no outcome yet
        folder.journal_start(KEY, 77, {"server": GATEWAY, "queue": "q"})
        assert folder.journal_update(KEY, log_offset=120, elsewhere=True)
        [entry] = folder.journal_leftovers()
        assert entry["key"] == KEY and entry["pid"] == 77 and entry["server"] == GATEWAY
        assert entry["log_offset"] == 120 and entry["elsewhere"] is True
        record_exit(folder.exit_file(KEY), 0)
        stray = JobKey("d", "gone", "r", 1, -1, None)
        record_exit(folder.exit_file(stray), 1)
        assert folder.prune_exits() == 1  # only the record without a journal entry
        assert read_exit(folder.exit_file(KEY)) == 0
        folder.journal_done(KEY)
        assert folder.journal_leftovers() == [] and not folder.exit_file(KEY).exists()
        assert not folder.journal_update(KEY, log_offset=1)  # a done job is not brought back
        assert folder.journal_leftovers() == []
        folder.journal_start(KEY, None)
        folder._entry(KEY).write_text("[1, 2]")  # noqa: SLF001 - valid JSON, not an entry
        assert not folder.journal_update(KEY, task_state="success")  # refused, not a TypeError
        folder.journal_done(KEY)
    finally:
        folder.release()


def test_gateway_address_is_remembered_and_garbage_is_ignored(tmp_path: Path) -> None:
    assert read_record(tmp_path) == (None, None)
    record = GatewayRecord(40001, "/0123456789abcdef0123456789abcdef/execution/")
    save_record(tmp_path, record)
    assert read_record(tmp_path) == (record, None)
    bads: list[object] = [{"port": p, "prefix": record.prefix} for p in (0, "1", 70000, True)]
    bads += ["nope", {"port": 40001},  # written before the prefix existed: its URL is not this version's
             {"port": 40001, "prefix": "/execution/"}, {"port": 40001, "prefix": "/XYZ/execution/"}]
    for bad in bads:
        (tmp_path / "gateway.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        (tmp_path / "gateway.json").chmod(0o600)
        assert read_record(tmp_path) == (None, None), bad


# -- the decision --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "kwargs", "action", "state", "reason"),
    [
        ({}, {"final_state": "success", "alive": True}, "report", "success", "queued before the crash"),
        ({"elsewhere": True}, {"exit_code": 0, "alive": True}, "leave", None, "another worker"),
        # No state of its own seen: the control plane is asked, failed if it cannot say; never success.
        ({}, {"exit_code": 0}, "ask", "failed", "recorded exit code 0 but the worker saw no final state"),
        ({}, {"exit_code": 0, "alive": True}, "ask", "failed", "recorded exit code 0"),
        ({}, {"exit_code": 1}, "ask", "failed", "exit code 1"),
        ({}, {"exit_code": -9, "policy": "stop"}, "ask", "failed", "exit code -9"),
        ({}, {}, "ask", "failed", "gone and recorded no outcome"),
        ({"task_state": "up_for_retry"}, {"exit_code": 0}, "report", "up_for_retry", "reported up_for_retry"),
        ({"task_state": "running"}, {"exit_code": 0}, "ask", "failed", "no final state"),
        # A callback reports no state of its own: its exit code is its outcome.
        ({"kind": "ExecuteCallback"}, {"exit_code": 0}, "report", "success", "callback process recorded exit code 0"),
        ({"kind": "ExecuteCallback"}, {"exit_code": 2}, "report", "failed", "exit code 2"),
        ({"kind": "ExecuteCallback"}, {}, "report", "failed", "callback process is gone"),
        ({}, {"policy": "stop", "alive": True}, "stop", "failed", "crash_policy is stop"),
        ({}, {"alive": True}, "adopt", None, "still running"),
        # The URL of a version before the gateway's prefix, or of a gateway this run could not serve again.
        ({"server": "http://127.0.0.1:40001/execution/"}, {"alive": True}, "stop", "failed", "was not kept"),
        ({"server": "http://127.0.0.1:40002/0123456789abcdef0123456789abcdef/execution/"},
         {"alive": True, "gateway_moved": "the previous port 40002 could not be bound again"}, "stop", "failed",
         "at http://127.0.0.1:40002/<prefix>/execution/, but this run's gateway is at "
         "http://127.0.0.1:40001/<prefix>/execution/ (the previous port 40002 could not be bound again)"),
        ({"server": None}, {"alive": True}, "stop", "failed", "lacks server"),
        ({"ti_id": None, "output": None}, {"alive": True}, "stop", "failed", "lacks output, ti_id"),
    ],
)
def test_decide(changes: dict, kwargs: dict, action: str, state: str | None, reason: str) -> None:
    args = {"final_state": None, "exit_code": None, "alive": False, "policy": "adopt", "gateway_url": GATEWAY, **kwargs}
    decision = decide({**ENTRY, **changes}, **args)
    assert (decision.action, decision.state) == (action, state)
    assert reason in decision.reason


def test_an_adopted_job_is_rebuilt_from_its_entry_without_a_token() -> None:
    job = job_from_entry(ENTRY)
    assert job.key == KEY and job.queue == "default" and job.concurrency_slots == 2
    assert job.workload == {"ti": {"id": ENTRY["ti_id"]}} and job.log_path == "d/r/t/1.log"


def test_an_adopted_callback_is_rebuilt_as_a_callback_and_a_0_1_entry_as_a_task() -> None:
    callback = job_from_entry({**ENTRY, "kind": "ExecuteCallback"})
    assert callback.kind == "ExecuteCallback" and callback.subject == ENTRY["ti_id"] and callback.ti_id is None
    old = job_from_entry({k: v for k, v in ENTRY.items() if k != "kind"})  # journaled by 0.1: no kind
    assert old.kind == "ExecuteTask" and old.ti_id == ENTRY["ti_id"]


def test_an_adopted_job_keeps_its_gpus_unless_another_job_holds_them() -> None:
    gpus = GpuAllocator(["0", "1", "2"], ["gpu*"])
    assert gpus.claim("a", ("1", "7")) == ("1",)  # 7 is not on this host
    assert gpus.claim("b", ("1", "2")) == ("2",)
    assert gpus.free == 1 and gpus.allocate("c", 1) == ("0",)


# -- processes -----------------------------------------------------------------------------------
def test_adopted_process_reports_the_exit_code_it_recorded(tmp_path: Path) -> None:
    exit_file = tmp_path / "exit.json"
    proc = _fake_task(exit_file)

    async def main() -> tuple[int, AdoptedProcess]:
        adopted = AdoptedProcess(proc.pid, tmp_path / "out", exit_file, process_start_time(proc.pid), poll_s=0.05)
        assert adopted.returncode is None
        # Not our child: only polling sees it end (the test, its parent, reaps the zombie).
        asyncio.get_running_loop().call_later(0.3, proc.send_signal, signal.SIGUSR1)
        asyncio.get_running_loop().call_later(0.6, proc.wait)
        return await asyncio.wait_for(adopted.wait(), 30), adopted

    try:
        code, adopted = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
    assert code == 3 and adopted.outcome_recorded is True
    assert adopted.describe_exit(code) == "exit code 3"


def test_adopted_process_gone_without_a_record_is_never_a_success(tmp_path: Path) -> None:
    proc = _fake_task(tmp_path / "exit.json")

    async def main() -> tuple[int, AdoptedProcess]:
        adopted = AdoptedProcess(proc.pid, tmp_path / "out", tmp_path / "exit.json", process_start_time(proc.pid),
                                 poll_s=0.05)
        asyncio.get_running_loop().call_later(0.3, proc.kill)
        return await asyncio.wait_for(adopted.wait(), 30), adopted

    try:
        code, adopted = asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()
    assert code != 0 and adopted.outcome_recorded is False
    assert "no recorded outcome" in adopted.describe_exit(code)


def test_only_our_own_live_task_processes_count(tmp_path: Path) -> None:
    ours = _fake_task(tmp_path / "exit.json")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        started = process_start_time(ours.pid)
        assert started is not None and is_our_process(ours.pid, started) and is_our_process(ours.pid)
        assert not is_our_process(ours.pid, started - 100)  # same pid, another process (pid reuse)
        assert not is_our_process(other.pid) and not is_our_process(None)
        assert stop_process_tree(other.pid) == 0 and other.poll() is None  # never someone else's
    finally:
        other.kill()
        other.wait()
        ours.kill()
        ours.wait()
    assert not is_our_process(ours.pid)


@pytest.mark.parametrize("argv", [
    ["-m", "worker.task_process", "--zygote"],  # left by a 0.1 worker: still ours after an upgrade
    ["-m", "airflow_outpost.worker.processes.task_main"],
])
def test_task_processes_of_this_and_the_previous_release_are_recognised(argv: list[str]) -> None:
    # Not yet renamed (a zygote, or a task before it read its request): only the module marks it.
    # `python -c ... -m x` keeps "-m x" as arguments, so the command line holds them as a real one would.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "worker"])
    try:
        assert is_our_process(proc.pid) and not is_our_process(other.pid)
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


def test_stopping_a_leftover_takes_its_whole_session(tmp_path: Path) -> None:
    # A task process (session leader) with a child in its session that outlives it, as a task's
    # helper re-parented after a crash would.
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print(c.pid, flush=True); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", script, "airflow_outpost.worker.processes.task_main"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert leader.stdout is not None
    child = int(leader.stdout.readline())
    try:
        assert os.getsid(child) == leader.pid
        assert stop_process_tree(leader.pid, process_start_time(leader.pid)) == 2
        leader.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the task's child survived"
            time.sleep(0.05)
    finally:
        leader.kill()
        leader.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- the gateway port ----------------------------------------------------------------------------
def _egress(tmp_path: Path) -> Egress:
    settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state")}, env={})
    return Egress(settings, upstream_transport=httpx.MockTransport(lambda r: httpx.Response(204)))


def test_gateway_binds_its_previous_port_again(tmp_path: Path) -> None:
    async def main() -> None:
        first = _egress(tmp_path)
        url = await first.start()
        port = first.port
        assert port and first.port_kept is None  # nothing recorded: any free port
        async with httpx.AsyncClient() as client:  # leave a connection behind, as a crash would
            await client.put(f"{first.url}task-instances/x/heartbeat")
        await first.aclose()
        second = _egress(tmp_path)  # the same state folder
        try:
            assert await second.start() == url == f"http://127.0.0.1:{port}{first.gateway.prefix}"
            assert second.port_kept is True
        finally:
            await second.aclose()

    asyncio.run(main())


def test_gateway_falls_back_to_a_free_port_when_its_previous_one_is_taken(tmp_path: Path, caplog) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]

    async def main() -> None:
        save_record(tmp_path / "state", GatewayRecord(taken, "/0123456789abcdef0123456789abcdef/execution/"))
        egress = _egress(tmp_path)
        try:
            url = await egress.start()
            assert egress.port_kept is False and egress.port != taken and url.endswith("/execution/")
            assert "0123456789abcdef" not in url  # a new prefix with the new port
        finally:
            await egress.aclose()

    try:
        asyncio.run(main())
    finally:
        squatter.close()
    assert f"could not bind the egress gateway's previous port {taken}" in caplog.text


# -- states reported before recovery, and asking the control plane --------------------------------
class _EdgeJobs:
    def __init__(self) -> None:
        self.reported: list[tuple[JobKey, str]] = []

    async def set_state(self, key: JobKey, state: str) -> None:
        self.reported.append((key, state))


class _EdgeClient:
    def __init__(self) -> None:
        self.jobs = _EdgeJobs()


def _leftover_task_state(tmp_path: Path, *, sent_state: str | None, server_state: str) -> tuple[list, list[str]]:
    """A try the previous worker process journaled, whose task process ended (exit code 0, as the
    Task SDK's supervisor exits after its task failed) while the restarted worker had not yet
    recovered it: it sends a heartbeat and, if ``sent_state``, its final state through the gateway.
    Returns what the worker reported to the Edge API and which requests the fake control plane saw."""
    from airflow_outpost.worker.runtime.job_runner import JobRunner
    from airflow_outpost.worker.runtime.link import ControlPlaneLink
    from airflow_outpost.worker.testing.task_tokens import task_token

    ti_id = str(ENTRY["ti_id"])
    settings = load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path / "state"),
                              "crash_policy": "adopt", "push_logs": "false"}, env={"OUTPOST_JWT_SECRET": "s" * 64})
    folder = StateFolder(settings.state_folder)
    folder.journal_start(KEY, 4242, {k: v for k, v in ENTRY.items() if k not in ("key", "pid")})
    record_exit(folder.exit_file(KEY), 0)
    seen: list[str] = []

    def control_plane(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path.endswith("/task-instances/states"):
            assert request.headers["authorization"] == f"Bearer {task_token(ti_id)}"
            return httpx.Response(200, json={"task_states": {KEY.run_id: {KEY.task_id: server_state}}})
        return httpx.Response(204)

    async def scenario() -> list:
        noted: list[tuple[str, str]] = []
        egress = Egress(settings, upstream_transport=httpx.MockTransport(control_plane),
                        on_task_state=lambda ti, state: noted.append((ti, state)) or runner.note_task_state(ti, state))
        client = _EdgeClient()
        runner = JobRunner(settings, client=client, egress=egress, launcher=None, state_folder=folder,  # type: ignore[arg-type]
                           link=ControlPlaneLink(queues=None, concurrency=1), gpus=GpuAllocator([], ()), counter=None,  # type: ignore[arg-type]
                           events=None, costs=None, budgets=None, ray=None, sysinfo=dict,  # type: ignore[arg-type]
                           on_slot_freed=lambda: None)
        assert runner.admit_leftovers() == 1
        url = await egress.start()
        try:
            headers = {"Authorization": f"Bearer {task_token(ti_id)}"}
            async with httpx.AsyncClient(base_url=url, headers=headers) as task:
                assert (await task.put(f"task-instances/{ti_id}/heartbeat", json={"pid": 1})).status_code == 204
                if sent_state:
                    assert (await task.patch(f"task-instances/{ti_id}/state", json={"state": sent_state})).status_code == 204
            await runner.recover_leftovers()
            assert await runner.reports.flush(10)
            assert ti_id not in egress.running  # recovered, not adopted: its token no longer passes
        finally:
            await runner.aclose()
            await egress.aclose()
        return client.jobs.reported

    return asyncio.run(scenario()), seen


def test_a_state_a_leftover_try_reports_before_recovery_is_the_one_reported(tmp_path: Path) -> None:
    reported, seen = _leftover_task_state(tmp_path, sent_state="failed", server_state="failed")
    assert reported == [(KEY, "failed")]  # not success from its exit code 0
    assert f"PATCH /execution/task-instances/{ENTRY['ti_id']}/state" in seen  # it reached the control plane
    assert "GET /execution/task-instances/states" not in seen  # known: nothing to ask


@pytest.mark.parametrize(("server_state", "reported_state"), [
    ("up_for_retry", "up_for_retry"), ("success", "success"), ("running", "failed"), ("skipped", "success")])
def test_a_leftover_try_whose_own_state_was_not_seen_gets_the_control_planes(
        tmp_path: Path, server_state: str, reported_state: str) -> None:
    reported, seen = _leftover_task_state(tmp_path, sent_state=None, server_state=server_state)
    assert reported == [(KEY, reported_state)]  # "running": the try's end never reached it, so failed
    assert "GET /execution/task-instances/states" in seen


def test_asking_needs_a_token_the_try_sent(tmp_path: Path) -> None:
    async def scenario() -> str | None:
        egress = Egress(load_settings({"api_url": "http://cp.invalid:8080", "state_folder": str(tmp_path)}, env={}),
                        upstream_transport=httpx.MockTransport(lambda r: httpx.Response(500)))
        try:
            return await egress.ask_try_state(str(ENTRY["ti_id"]), "d", "r", "t", -1)
        finally:
            await egress.aclose()

    assert asyncio.run(scenario()) is None
