"""Crash recovery: what a restarted worker does with the jobs its previous process left behind.

Every job the worker claims is journaled (:mod:`airflow_outpost.worker.runtime.state`) with its task process's pid and,
once the process runs, what a restart needs to take it over (:func:`journal_details`). When the
worker starts with a state folder that still holds entries, :func:`decide` picks, per entry:

1. its final state is already in the outbox: report that (the crash interrupted delivery);
2. the server refused its start because another worker runs that try: leave it to that worker
   (stop our process if it still runs; report nothing, which could fail the other's task);
3. its task process ended (it recorded an exit code, :func:`airflow_outpost.worker.runtime.state.record_exit`, or
   it is gone) after it reported its try's final state, which the worker journaled: report that
   state, and stop what the task left running;
4. its task process ended and the worker saw no final state of its try: *ask* the control plane
   (:meth:`airflow_outpost.worker.egress.gateway.Egress.ask_try_state`) and report the final state
   it holds, else ``failed``. Never ``success`` from an exit code: the Task SDK's supervisor exits
   0 after its task reported ``failed`` or ``up_for_retry``. A callback reports no state of its
   own: its exit code is its outcome;
5. its task process is still alive and is ours (same pid, same start time, our command line):
   with ``crash_policy = adopt`` and the process able to reach this run's gateway (the same port
   and secret prefix: :mod:`airflow_outpost.worker.egress.gateway_file`), *adopt* it
   (:class:`AdoptedProcess`); otherwise stop it and report ``failed``. A gateway address recorded
   in a file that cannot be trusted, or a recorded port another user now listens on (it would
   receive the process's token), counts as not reachable: stopping the process ends the leak.

With ``crash_policy = adopt`` the gateway serves the journaled tries from the moment it starts,
before registration and this recovery (:meth:`airflow_outpost.worker.runtime.adoption.Adoption.admit`):
a state a task process reports in between reaches the control plane and is journaled, so the
recovery (or the adopted job) reports it.

A task waiting on a local trigger (``triggers = local``) has no process: with ``crash_policy =
adopt`` its trigger starts again in this run and the task still resumes; with ``stop`` it is
reported ``failed``.

Airflow retries a failed try as its task's ``retries`` allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil

from airflow_outpost.worker.edge.jobs import Job
from airflow_outpost.worker.egress.admission import masked
from airflow_outpost.worker.processes.launcher import TaskProcess
from airflow_outpost.worker.runtime.outcome import outcome
from airflow_outpost.worker.runtime.state import read_exit
from airflow_outpost.worker.triggers.host import Deferral

if TYPE_CHECKING:
    from airflow_outpost.worker.runtime.job_table import RunningJob

log = logging.getLogger(__name__)

# The fields adoption needs, besides the key and the pid (see journal_details).
_ADOPT_FIELDS = ("output", "server", "queue", "slots", "log_path", "dag_rel_path", "ti_id")


@dataclass(frozen=True)
class Decision:
    """What to do with one leftover journal entry; ``state`` is the report for report/stop, and
    for ask the report when the control plane cannot say."""

    action: Literal["report", "adopt", "stop", "leave", "ask"]
    state: str | None
    reason: str


def journal_details(run: RunningJob, server: str) -> dict[str, Any]:
    """What the journal must hold for a later worker process to adopt ``run``'s task process.

    The workload's token is left out on purpose: the process already has it, and the journal is
    not a place for credentials.
    """
    job, proc = run.job, run.proc
    assert proc is not None
    return {
        "create_time": process_start_time(proc.pid), "output": str(proc.output), "server": server,
        "queue": job.queue, "slots": job.concurrency_slots, "log_path": job.log_path,
        # "ti_id" holds the workload's own id (a callback's for a callback), under its 0.1 name.
        "dag_rel_path": job.dag_rel_path, "ti_id": job.subject, "kind": job.kind, "devices": list(run.devices),
    }


def job_from_entry(entry: dict[str, Any]) -> Job:
    """The :class:`Job` of an entry :func:`decide` chose to adopt (its workload holds only the
    workload's id, which is all a running job needs of it)."""
    kind = str(entry.get("kind") or "ExecuteTask")  # 0.1 journals hold tasks only
    subject = str(entry["ti_id"])
    workload = {"callback": {"id": subject}} if kind == "ExecuteCallback" else {"ti": {"id": subject}}
    if isinstance(entry.get("workload"), dict):
        workload = entry["workload"]  # it deferred to a local trigger: the whole workload (no token) was kept
    return Job(key=entry["key"], concurrency_slots=int(entry["slots"]), queue=str(entry["queue"]),
               workload=workload, log_path=str(entry["log_path"]), dag_rel_path=str(entry["dag_rel_path"]), kind=kind)


def waiting_job_from_entry(entry: dict[str, Any]) -> tuple[Job, Deferral]:
    """The :class:`Job` and :class:`Deferral` of an entry whose task waited on a local trigger
    (:func:`decide` chose to adopt it); its workload gets back the try's newest token."""
    deferral = Deferral.from_json(entry["deferral"])
    job = Job(key=entry["key"], concurrency_slots=int(entry.get("slots") or 1), queue=str(entry.get("queue") or "default"),
              workload={**entry["workload"], "token": deferral.token}, log_path=str(entry["log_path"]),
              dag_rel_path=str(entry.get("dag_rel_path") or ""), kind="ExecuteTask")
    return job, deferral


def decide(entry: dict[str, Any], *, final_state: str | None, exit_code: int | None, alive: bool,
           policy: str, gateway_url: str | None, local_triggers: bool = False,
           gateway_moved: str | None = None) -> Decision:
    """Choose what to do with a leftover journal entry (see the module docstring). Pure.

    ``alive``: the entry's process runs and is ours (:func:`is_our_process`); ``gateway_url``:
    the URL this run's gateway serves task processes on; ``local_triggers``: this run has
    ``triggers = local``; ``gateway_moved``: why this run's gateway is not at the previous
    run's address, if it is not (:attr:`airflow_outpost.worker.egress.gateway.Egress.gateway_moved`).
    """
    if final_state:
        return Decision("report", final_state, "its final state was queued before the crash")
    if entry.get("elsewhere"):
        return Decision("leave", None, "the server refused its start: another worker runs this try")
    if entry.get("waiting") and entry.get("deferral"):
        # No process waits: the trigger ran in the worker's trigger runner, which died with it.
        if policy == "adopt" and local_triggers and entry.get("workload"):
            return Decision("adopt", None, "it waits on a local trigger (started again here)")
        why = "crash_policy is stop" if policy != "adopt" else "this run does not have triggers = local"
        return Decision("report", "failed", f"it waited on a local trigger and {why}")
    reported = outcome(entry.get("task_state"), exit_code)
    callback = entry.get("kind") == "ExecuteCallback"  # reports no state of its own: the exit code is its outcome
    if exit_code is not None:
        if reported.source == "task" or callback:
            why = (f"its task process reported {reported.state}" if reported.source == "task"
                   else f"its callback process recorded exit code {exit_code}")
            return Decision("report", reported.edge_state, why)
        return Decision("ask", "failed", f"its task process recorded exit code {exit_code} but the worker saw no "
                                         "final state of its try")
    if not alive:
        if reported.source == "task":
            return Decision("report", reported.edge_state, f"its task process is gone; it had reported {reported.state}")
        if callback:
            return Decision("report", "failed", "its callback process is gone and recorded no outcome")
        return Decision("ask", "failed", "its task process is gone and recorded no outcome")
    if policy != "adopt":
        return Decision("stop", "failed", "crash_policy is stop")
    missing = [f for f in _ADOPT_FIELDS if entry.get(f) is None]
    if missing:
        return Decision("stop", "failed", f"its journal entry lacks {', '.join(missing)} (written before adoption existed)")
    if entry["server"] != gateway_url:
        # Both URLs hold a secret prefix, which reasons (logged, reported) never show.
        why = gateway_moved or "the previous gateway's address was not kept"
        return Decision("stop", "failed", f"it talks to the gateway at {masked(str(entry['server']))}, but this run's "
                                          f"gateway is at {masked(str(gateway_url))} ({why}), so it could not reach "
                                          "the control plane")
    return Decision("adopt", None, "its task process is still running")


def process_start_time(pid: int) -> float | None:
    """When ``pid`` started (to tell it from a later process given the same pid), or ``None``."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_our_process(pid: int | None, start_time: float | None = None) -> bool:
    """True if ``pid`` is a live (not zombie) task process of ours, started at ``start_time``
    when that is known."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if start_time is not None and abs(proc.create_time() - start_time) > 1.0:
            return False  # the pid was reused
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # A task process renames itself "outpost task: ..."; /proc then shows one string, which psutil
    # splits at spaces, so look at the whole line.
    line = " ".join(cmd)
    return any(marker in line for marker in TASK_PROCESS_MARKERS)


# What a task process's command line holds: the title it sets once it knows its task, else the module
# it runs. "worker.task_process" is that module under 0.1, whose task processes may still be running
# (crash_policy adopt) when this version restarts the worker on the same state folder.
TASK_PROCESS_MARKERS = ("outpost task:", "airflow_outpost.worker.processes.task_main", "worker.task_process")


def stop_process_tree(pid: int, start_time: float | None = None) -> int:
    """SIGKILL ``pid`` (if it is still our task process), its descendants and whatever else is
    left in its session; return how many processes were signalled.

    A task process leads its own session, so its leftovers are found by session id even after
    they were re-parented. While any of them lives the kernel does not hand the pid to a new
    process; a live pid that is not our task process means the session is someone else's.
    """
    targets: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(pid)
        zombie = leader.status() == psutil.STATUS_ZOMBIE
        root: psutil.Process | None = leader
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        root, zombie = None, False
    if root is not None and not zombie:
        if not is_our_process(pid, start_time):
            return 0
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            targets.update({p.pid: p for p in root.children(recursive=True)})
        targets[pid] = root
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.pid != pid and os.getsid(proc.pid) == pid:
                targets[proc.pid] = proc
    killed = 0
    for proc in targets.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
            killed += 1
    return killed


class AdoptedProcess(TaskProcess):
    """A task process a previous worker process started, taken over after a crash.

    It is not our child, so its end is noticed by polling its pid every ``poll_s``, and its exit
    code is read from the exit file it records (:func:`airflow_outpost.worker.runtime.state.record_exit`). If it ends
    without recording one, :meth:`wait` returns :data:`NO_OUTCOME` and :attr:`outcome_recorded`
    is False: the job is reported failed, never success. Signals are sent only while the pid is
    still the same process. Cancelling :meth:`wait` does not stop the polling.
    """

    NO_OUTCOME = -signal.SIGKILL

    def __init__(self, pid: int, output: Path, exit_file: Path, start_time: float | None, *, poll_s: float = 0.5) -> None:
        super().__init__(pid, output, asyncio.get_running_loop().create_future())
        self.exit_file = exit_file
        self.start_time = start_time
        self.outcome_recorded: bool | None = None
        self._poller = asyncio.create_task(self._poll(poll_s), name=f"adopted task process {pid}")

    async def _poll(self, poll_s: float) -> None:
        while is_our_process(self.pid, self.start_time):
            await asyncio.sleep(poll_s)
        # The exit file is written before the process exits, so it is complete by now.
        code = read_exit(self.exit_file)
        self.outcome_recorded = code is not None
        if not self._exit.done():
            self._exit.set_result(code if code is not None else self.NO_OUTCOME)

    def describe_exit(self, code: int) -> str:
        if self.outcome_recorded is False:
            return "no recorded outcome (the adopted task process ended without recording its exit code)"
        return super().describe_exit(code)

    def signal(self, sig: int, *, group: bool = False) -> None:
        if is_our_process(self.pid, self.start_time):
            super().signal(sig, group=group)

    def kill_task_tree(self) -> None:
        if is_our_process(self.pid, self.start_time):
            super().kill_task_tree()


def stop_leftover(entry: dict[str, Any], decision: Decision) -> None:
    """Stop a leftover job's process if it still runs, and what its task left behind, logging it."""
    pid, key = entry.get("pid"), entry["key"]
    if not pid:
        return
    killed = stop_process_tree(pid, entry.get("create_time"))
    if not killed:
        return
    if decision.action in ("stop", "leave"):
        log.warning("stopped task process %d left over from a previous run for %s (%s)", pid, key, decision.reason)
    else:
        log.warning("killed %d process(es) that %s left running after it ended", killed, key)
