"""Runs fetched jobs: validate, launch a task process, report running, wait, report the outcome.

Every claimed job is journaled in the state folder (with its task process's pid) before it
starts. Every report the worker owes the control plane goes to the durable outbox
(:mod:`airflow_outpost.worker.runtime.outbox`) first; one sender delivers it in order and removes it only once the server
acknowledged it, retrying through outages and replaying what is left at the next start, so a
finished task's state is never dropped. The journal entry is removed once the job's final state
is in the outbox. After a crash, :meth:`JobRunner.recover_leftovers` reports, stops or (with
``crash_policy = adopt``) takes over the jobs the previous process left (:mod:`airflow_outpost.worker.runtime.recovery`).

A job whose workload token expired while it waited in the queue is not started: it is reported
failed (Airflow retries it), with the reason in the worker log, the task log and the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from airflow_outpost.worker.config import AFTER_KILL_WAIT_S
from airflow_outpost.worker.edge.jobs import Job, JobKey, RejectedJob, parse_job, resolve_inside
from airflow_outpost.worker.edge.tokens import expired_for
from airflow_outpost.worker.egress.gateway import Resume
from airflow_outpost.worker.errors import JobRejected, LaunchTimeoutError, OutpostError
from airflow_outpost.worker.hosted.costs import live_tasks
from airflow_outpost.worker.processes.launcher import TaskLauncher, TaskProcess
from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.runtime.outbox import Outbox
from airflow_outpost.worker.runtime.outcome import TASK_FINAL_STATES, outcome
from airflow_outpost.worker.runtime.reports import ReportSender
from airflow_outpost.worker.runtime.state import read_exit
from airflow_outpost.worker.runtime.task_logs import LogShipper
from airflow_outpost.worker.triggers.host import Deferral, LocalTriggers, ResumeQueue, WaitEnd

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.edge.request_counter import RequestCounter
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.hosted.costs import BudgetGuard, CostLedger
    from airflow_outpost.worker.hosted.gpu import GpuAllocator
    from airflow_outpost.worker.hosted.ray_host import RayHost
    from airflow_outpost.worker.runtime.link import ControlPlaneLink
    from airflow_outpost.worker.runtime.state import StateFolder


class JobEvents(Protocol):
    """Where the job runner reports what happens to jobs (``WorkerMetrics`` in the worker)."""

    def job_event(self, queue: str, state: str) -> None: ...
    def job_started(self, queue: str, pickup_s: float) -> None: ...
    def job_finished(self, queue: str, state: str, duration_s: float, kind: str) -> None: ...

log = logging.getLogger(__name__)


@dataclass
class RunningJob:
    job: Job
    proc: TaskProcess | None = None
    task: asyncio.Task[None] | None = None
    log_offset: int = 0
    started: float = 0.0
    devices: tuple[str, ...] = ()  # GPUs this job holds (CUDA_VISIBLE_DEVICES)
    adopted: bool = False  # started by a previous worker process (crash_policy adopt)
    task_state: str | None = None  # the last state its task process reported and the server accepted
    deferral: Deferral | None = None  # its task deferred to a local trigger (triggers = local)
    waiting: bool = False  # waiting on that trigger: no task process, no slot
    resume_pending: bool = False  # its trigger ended; waiting for a slot to resume in


class JobRunner:
    """Owns the jobs of one worker: fetches them, runs them, reports them, drains them.

    It is given what it works with; it never sees the ``Worker``. ``on_slot_freed`` is called when
    a job ends (the main loop then fetches at once). ``aclose()`` is safe twice; undelivered reports
    stay in the outbox for the next start.
    """

    def __init__(self, settings: Settings, *, client: EdgeClient, egress: Egress, launcher: TaskLauncher,
                 state_folder: StateFolder, link: ControlPlaneLink, gpus: GpuAllocator, counter: RequestCounter,
                 events: JobEvents, costs: CostLedger, budgets: BudgetGuard, ray: RayHost | None,
                 sysinfo: Callable[[], dict[str, Any]], on_slot_freed: Callable[[], None],
                 triggers: LocalTriggers | None = None) -> None:
        self.settings = settings
        self.client = client
        self.egress = egress
        self.launcher = launcher
        self.state_folder = state_folder
        self.link = link
        self.gpus = gpus
        self.counter = counter
        self.events = events
        self.costs = costs
        self.budgets = budgets
        self.ray = ray
        self.sysinfo = sysinfo
        self.on_slot_freed = on_slot_freed
        self.triggers = triggers
        self.running: dict[JobKey, RunningJob] = {}
        # Tries of the previous worker process the gateway serves before recovery (see
        # admit_leftovers): token subject (task instance or callback id) -> job key, until
        # recover_leftovers has run.
        self._leftovers: dict[str, JobKey] = {}
        self._leftover_states: dict[str, str] = {}  # the states they reported meanwhile (also journaled)
        self._stopping = False  # the drain timeout passed: no wait resumes any more
        self._resumes = ResumeQueue()  # tries whose trigger ended, in the order they wait for a slot
        self.outbox = Outbox(settings.state_folder / "outbox.sqlite")
        # Delivers the outbox (job states, then the worker's own) to the control plane, in order.
        self.logs = LogShipper(settings, client=client, egress=egress, state_folder=state_folder, outbox=self.outbox)
        self.reports = ReportSender(self.outbox, client=client, settings=settings, link=link, sysinfo=sysinfo,
                                    before_final=self.logs.ship_pending)  # a job's log goes before its final state
        self.expired = 0  # jobs whose token expired in the queue
        self._background: set[asyncio.Task[Any]] = set()
        self.rejected = 0
        self._fetch_turn = 0
        # Finished jobs by workload kind ("task", "callback") and final state, for `outpost status`.
        self.finished: dict[str, dict[str, int]] = {}

    @property
    def free_slots(self) -> int:
        # GPU jobs hold devices, not CPU slots (see airflow_outpost.worker.hosted.gpu); a task
        # waiting on a local trigger holds none (one whose trigger ended holds its slot again).
        return self.link.concurrency - sum(r.job.concurrency_slots for r in self.running.values()
                                           if not r.devices and not r.waiting)

    @property
    def waiting(self) -> int:
        """Jobs whose task waits on a local trigger."""
        return sum(1 for r in self.running.values() if r.waiting)

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"key": str(k), "pid": r.proc.pid if r.proc and not r.waiting else None, "slots": r.job.concurrency_slots,
                 "queue": r.job.queue, "running_s": round(now - r.started, 1), "adopted": r.adopted,
                 "waiting": r.waiting}
                for k, r in self.running.items()]

    # -- fetch and run -----------------------------------------------------------------------
    async def fetch_one(self) -> bool:
        """Ask for one job that fits the free slots and start it. True if a job was claimed."""
        s = self.settings
        self._fetch_turn += 1
        paused = self.budgets.paused
        raw = None
        # CPU queues with the free slots, GPU queues with the free GPUs; spent budgets left out.
        for group in self.gpus.fetch_plan(self.link.queues, self.free_slots, paused, self._fetch_turn):
            try:
                raw = await self.client.jobs.fetch(s.name, list(group.queues) if group.queues is not None else None,
                                                     group.free, s.team_name)
            except JobRejected as exc:  # e.g. an oversized reply: refused unread
                await self._reject(exc, None)
                return True
            except OutpostError as exc:
                if exc.retryable:
                    self.link.mark_unreachable()
                log.warning("fetching a job failed: %s", exc)
                return False
            if raw is not None:
                break
        if raw is None:
            return False
        try:
            job = parse_job(raw)
        except RejectedJob as exc:
            await self._reject(exc, exc.key)
            return True
        try:
            resolve_inside(s.log_folder, job.log_path, "log_path")
            if s.dags_folder is not None:
                resolve_inside(s.dags_folder, job.dag_rel_path, "dag_rel_path")
        except JobRejected as exc:
            await self._reject(exc, job.key)
            return True
        run = RunningJob(job=job, started=time.monotonic(),
                         devices=self.gpus.assign(job.key, job.queue, job.concurrency_slots))
        self.running[job.key] = run
        self.events.job_event(job.queue, "fetched")
        self.counter.set_busy(True)
        run.task = asyncio.create_task(self._run(run), name=f"job {job.key}")
        return True

    async def _reject(self, exc: Exception, key: JobKey | None) -> None:
        self.rejected += 1
        self.events.job_event("unknown", "rejected")
        log.error("rejected job %s: %s", key or "<unreadable>", exc)
        self.egress.record_rejected_job(str(exc), str(key) if key else None)
        if key is not None:
            await self._report_final(key, "failed")

    async def _launch(self, run: RunningJob) -> bool:
        """Journal and start a new job's task process; False if the job was refused instead."""
        job, key = run.job, run.job.key
        self.state_folder.journal_start(key, None)
        if (expired_s := expired_for(job.workload.get("token"))) is not None:
            await self._expired(run, expired_s)
            return False
        try:
            server = await self._start_process(run, job.workload)
        except LaunchTimeoutError as exc:  # failed here, retried elsewhere; a late process is killed
            await self._report_final(key, "failed", note=f"not started: {exc}")
            return False
        assert run.proc is not None
        self.state_folder.journal_start(key, run.proc.pid, recovery.journal_details(run, server))
        log.info("started %s (pid %d)%s", key, run.proc.pid, f" on GPU {','.join(run.devices)}" if run.devices else "")
        self._enqueue(key, "running")
        self.events.job_started(job.queue, time.monotonic() - run.started)
        return True

    async def _start_process(self, run: RunningJob, workload: dict[str, Any]) -> str:
        """Start a task process for ``run`` (its GPUs and Ray decided now); the gateway URL it got."""
        env = {"CUDA_VISIBLE_DEVICES": ",".join(run.devices)} if self.gpus.total else {}
        if self.ray is not None:
            env.update(self.ray.task_env())  # decided now: none while the worker's own Ray is down
        server = self.egress.task_server(run.job)
        run.proc = await self.launcher.launch(workload, server, env, exit_file=self.state_folder.exit_file(run.job.key))
        return server

    async def _run(self, run: RunningJob) -> None:
        job, key = run.job, run.job.key
        state = "failed"
        try:
            # An adopted job's process runs already (started by the previous worker process), and
            # an adopted waiting job has none until its trigger ends.
            if run.proc is None and run.deferral is None and not await self._launch(run):
                return
            while True:
                if not run.waiting:
                    assert run.proc is not None
                    rc = await self._wait(run)
                    if (leftovers := run.proc.kill_session()):
                        log.warning("killed %d process(es) that %s left running after it ended", leftovers, key)
                    # Whatever the exit code (the Task SDK may exit 0 after the server told it the try runs
                    # elsewhere): a success report from here would fail the task too, as "finished while
                    # still running".
                    if job.ti_id is not None and job.ti_id in self.egress.start_refused:
                        self.egress.start_refused.discard(job.ti_id)
                        state = "elsewhere"  # counted as such: neither this worker's success nor its failure
                        self._claimed_elsewhere(run)
                        return
                    if run.adopted and run.task_state not in TASK_FINAL_STATES and job.ti_id is not None:
                        await self._ask_outcome(run, rc)
                    result = outcome(run.task_state, rc)
                    if result.state != "deferred" or run.deferral is None or self.triggers is None:
                        state = result.state
                        await self._finish(run, rc, result.edge_state)
                        return
                    await self.logs.push(run)
                end = await self._wait_on_trigger(run)
                if end.kind in ("resume", "fail") and await self._resume(run, end):
                    continue
                if end.kind in ("resume", "fail"):
                    end = WaitEnd("stopped", error="the drain timeout passed before it could resume")
                state = await self._end_wait(run, end)
                return
        except Exception as exc:  # a bug or OS error must fail this job only, never the worker
            log.exception("job %s crashed in the worker", key)
            if run.proc is not None and run.proc.returncode is None:
                run.proc.kill_task_tree()
                run.proc.signal(signal.SIGKILL, group=True)
            await self._report_final(key, "failed", note=str(exc))
        finally:
            if run.proc is not None:
                run.proc.output.unlink(missing_ok=True)
            self.egress.forget_try(job.subject)  # its token no longer passes the gateway
            if job.ti_id is not None:
                if self.triggers is not None:
                    self.triggers.stop(job.ti_id, WaitEnd("stopped", error="its job ended"))
            self._account(run, state)
            self.gpus.release(key)
            self.running.pop(key, None)
            self.counter.set_busy(bool(self.running))
            self.on_slot_freed()

    async def _finish(self, run: RunningJob, rc: int, edge_state: str) -> None:
        """Log how the job's task process ended, push its last logs, queue its final state."""
        assert run.proc is not None
        key, took = run.job.key, time.monotonic() - run.started
        state = outcome(run.task_state, rc).state
        if rc != 0:
            log.error("job %s ended %s (supervisor %s) in %.1fs; supervisor output:\n%s", key, state,
                      run.proc.describe_exit(rc), took, run.proc.output_tail()[-2000:])
        elif state == "success":
            log.info("job %s succeeded in %.1fs", key, took)
        elif state in ("failed", "up_for_retry"):
            log.warning("job %s ended %s in %.1fs (the task reported it; supervisor exit code 0)", key, state, took)
        else:
            log.info("job %s ended %s in %.1fs", key, state, took)
        await self.logs.push(run, final=True, failure=None if rc == 0 else run.proc.describe_exit(rc))
        await self._report_final(key, edge_state)

    # -- local triggers ----------------------------------------------------------------------
    def note_deferral(self, ti_id: str, body: bytes, authorization: str | None) -> bool:
        """A task of ours defers (``triggers = local``): keep the deferral here; False to let it
        go to the control plane (not our task, or its start was not seen by this worker)."""
        run = next((r for r in self.running.values() if r.job.ti_id == ti_id), None)
        if self.triggers is None or run is None:
            return False
        start = self.egress.start_of(ti_id)
        if "dag_rel_path" not in run.job.workload:
            log.warning("job %s defers, but this worker adopted it without its workload, which a resume needs; it "
                        "waits on the control plane's triggerer instead", run.job.key)
            return False
        if start is None:
            log.warning("job %s defers, but this worker did not see its start; it waits on the control plane's "
                        "triggerer instead", run.job.key)
            return False
        try:
            deferral = Deferral.from_request(ti_id, body, authorization or "", start,
                                             self.settings.log_folder / run.job.log_path)
        except ValueError as exc:
            log.error("job %s: unreadable deferral (%s); sending it to the control plane", run.job.key, exc)
            return False
        run.deferral = deferral
        workload = {k: v for k, v in run.job.workload.items() if k != "token"}  # the token lives in the deferral
        try:
            self.state_folder.journal_update(run.job.key, deferral=deferral.to_json(), waiting=True, workload=workload)
        except OSError as exc:
            log.error("could not journal the deferral of %s (a worker crash now loses its wait): %s", run.job.key, exc)
        return True

    def note_token(self, ti_id: str, token: str) -> None:
        """The server refreshed a waiting try's token: journal it (a restart resumes with it)."""
        for run in self.running.values():
            if run.job.ti_id == ti_id and run.deferral is not None:
                with contextlib.suppress(OSError):
                    self.state_folder.journal_update(run.job.key, deferral=run.deferral.to_json())
                return

    async def _wait_on_trigger(self, run: RunningJob) -> WaitEnd:
        """Free the job's slot while its trigger runs on this worker; how the wait ended."""
        assert self.triggers is not None and run.deferral is not None
        run.waiting = True
        self.on_slot_freed()  # the main loop fetches at once: the slot is free for other tasks
        ended = self.triggers.wait(run.deferral, adopted=run.adopted and run.proc is None)
        log.info("job %s waits on local trigger %s (%d waiting)", run.job.key, run.deferral.classpath, self.waiting)
        try:
            while True:
                done, _ = await asyncio.wait({ended}, timeout=self.settings.poll_interval_s * 2)
                await self.logs.push(run)  # what the trigger logs goes to the task's log
                if done:
                    return ended.result()
        finally:
            run.waiting = False  # its slot is taken again (by _resume, or freed when the job ends)

    async def _resume(self, run: RunningJob, end: WaitEnd) -> bool:
        """Start the try again in a new task process, with Airflow's resume semantics; False if the
        worker's drain timeout passed while it waited for a slot (it is then not started)."""
        deferral, key = run.deferral, run.job.key
        assert deferral is not None
        if end.kind == "fail":
            resume = Resume(deferral.run_body, "__fail__", end.fail_kwargs(like=deferral.next_kwargs))
            log.warning("job %s: its local trigger ended in failure (%s); the task fails as Airflow's would", key, end.error)
        else:
            resume = Resume(deferral.run_body, deferral.next_method, end.next_kwargs)
        if not await self._take_slot(run):
            return False
        self.egress.expect_resume(deferral.ti_id, resume)
        workload = {**run.job.workload, "token": deferral.token}
        self.state_folder.exit_file(key).unlink(missing_ok=True)  # the deferring process's; not this one's
        if run.proc is not None:
            run.proc.output.unlink(missing_ok=True)
        run.task_state, run.deferral = None, None
        server = await self._start_process(run, workload)
        assert run.proc is not None
        details = recovery.journal_details(run, server)
        # task_state None: the resumed process reports its own; "deferred" is the first one's.
        self.state_folder.journal_update(key, pid=run.proc.pid, waiting=False, deferral=None, task_state=None, **details,
                                         resume={"run_body": resume.run_body, "next_method": resume.next_method,
                                                 "next_kwargs": resume.next_kwargs})
        log.info("resumed %s with %s (pid %d)", key, resume.next_method, run.proc.pid)
        return True

    async def _take_slot(self, run: RunningJob) -> bool:
        """Wait until the resumed try fits the worker's slots, first come first served; False if
        the drain timeout passes meanwhile."""
        if run.devices:
            return not self._stopping  # a GPU job kept its devices while it waited
        run.resume_pending = True
        try:
            return await self._resumes.take(
                run.job.key, run.job.concurrency_slots, lambda: self.link.concurrency,
                lambda: sum(r.job.concurrency_slots for r in self.running.values()
                            if not r.devices and not r.waiting and not r.resume_pending),
                give_up=lambda: self._stopping)
        finally:
            run.resume_pending = False

    async def _end_wait(self, run: RunningJob, end: WaitEnd) -> str:
        """A wait that resumes nothing: the trigger ended the task, the try went away, or the worker stops."""
        key = run.job.key
        assert self.triggers is not None
        if end.kind == "task_end" and run.deferral is not None and end.state is not None:
            state = await self.triggers.end_task(run.deferral, run.job.key, end.state, end.xcoms)
            if state is not None:
                log.info("job %s: its local trigger ended the task as %s", key, state)
                await self.logs.push(run, final=True)
                await self._report_final(key, "success" if state != "failed" else "failed")
                return state
            end = WaitEnd("gone", error="the control plane refused the state the trigger set")
        if end.kind == "gone" and run.job.ti_id in self.egress.start_refused:
            self.egress.start_refused.discard(run.job.ti_id)
            self._claimed_elsewhere(run)  # the server says another worker runs this try: not ours to fail
            return "elsewhere"
        if end.kind == "gone":
            log.warning("job %s: the control plane no longer runs this try (%s); its trigger stopped", key, end.error)
        else:
            log.warning("job %s: its wait on a local trigger was stopped (%s); reporting it failed", key, end.error)
        await self.logs.push(run, final=True)
        await self._report_final(key, "failed")
        return "failed"

    def _account(self, run: RunningJob, state: str) -> None:
        """Record the finished job in the metrics and the cost ledger (never fails the job)."""
        job = run.job
        wall = time.monotonic() - run.started
        kind = "callback" if job.kind == "ExecuteCallback" else "task"
        self.events.job_finished(job.queue, state, wall, kind)
        by_state = self.finished.setdefault(kind, {})
        by_state[state] = by_state.get(state, 0) + 1
        ended = time.time()
        try:
            self.costs.record(dag_id=job.key.dag_id, task_id=job.key.task_id, run_id=job.key.run_id,
                              try_number=job.key.try_number, map_index=job.key.map_index, queue=job.queue,
                              state=state, started=ended - wall, ended=ended, gpus=len(run.devices))
        except sqlite3.Error as exc:
            log.error("could not record the cost of %s: %s", job.key, exc)
        self.budgets.refresh(live_tasks(r for r in self.running.values() if r is not run), force=True)

    def _claimed_elsewhere(self, run: RunningJob) -> None:
        """The server refused to start this try because it already runs elsewhere.

        The edge3 fetch claims a job with ``SELECT ... FOR UPDATE SKIP LOCKED``, which is a no-op on
        SQLite: two workers can receive the same job. The server then refuses the second start (409
        on ``.../run``) or answers its first heartbeat ``running_elsewhere`` and the Task SDK stops
        it, before its task code runs or while it starts. That try belongs to the other worker, so
        this one reports nothing: a "failed" from here would fail a task that is running fine.
        """
        log.warning("job %s was handed to another worker as well and is running there (the server refused this "
                    "start); leaving its state to that worker", run.job.key)
        self.outbox.drop_job_reports(run.job.key)  # an undelivered "running" must not follow its success
        self.state_folder.journal_done(run.job.key)

    async def _wait(self, run: RunningJob) -> int:
        assert run.proc is not None
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(run.proc.wait()), self.settings.poll_interval_s * 2)
            except TimeoutError:
                if (leftovers := run.proc.reap_after_task()):
                    log.warning("killed %d process(es) that %s left running after it ended", leftovers, run.job.key)
                await self.logs.push(run)

    # -- reporting ---------------------------------------------------------------------------
    def _enqueue(self, key: JobKey, state: str, note: str | None = None) -> None:
        self.reports.put_job(key, state, note)

    async def _report_final(self, key: JobKey, state: str, note: str | None = None) -> None:
        """Queue the final state durably (the sender delivers it); the journal entry is then done."""
        if note:
            log.error("job %s reported %s: %s", key, state, note)
        self._enqueue(key, state, note)
        self.state_folder.journal_done(key)

    async def aclose(self) -> None:
        """Stop the report sender and close the outbox; what is undelivered stays for the next start. Idempotent."""
        await self.reports.aclose()

    async def recover_leftovers(self) -> None:
        """Handle journal entries of a previous worker process (crash, SIGKILL, OOM), then start
        sending the outbox (reports the previous process could not deliver go first).

        Each entry is reported, stopped and reported failed, left to another worker, or adopted
        (see :mod:`airflow_outpost.worker.runtime.recovery`); an adopted job runs on as if this process had started it.
        Call once, before fetching work.
        """
        self.outbox.open()
        if (dropped := self.outbox.drop_worker_reports()):
            log.info("dropped %d worker-state report(s) of a previous run (registration supersedes them)", dropped)
        folder, policy = self.state_folder, self.settings.crash_policy
        for entry in folder.journal_leftovers():
            key: JobKey = entry["key"]
            if (noted := self._leftover_states.get(str(entry.get("ti_id")))) is not None:
                entry["task_state"] = noted  # reported while an earlier entry was recovered
            decision = recovery.decide(
                entry, final_state=entry.get("final_state") or self.outbox.final_state(key),
                exit_code=read_exit(folder.exit_file(key)),
                alive=recovery.is_our_process(entry.get("pid"), entry.get("create_time")),
                policy=policy, gateway_url=self.egress.url, local_triggers=self.triggers is not None,
                gateway_moved=self.egress.gateway_moved)
            if decision.action == "adopt":
                if entry.get("waiting"):
                    recovery.stop_leftover(entry, decision)  # the deferring process, should it still be ending
                    self._adopt_waiting(entry)
                else:
                    self._adopt(entry)
                continue
            recovery.stop_leftover(entry, decision)
            if decision.action == "leave":
                log.warning("job %s from a previous worker run: %s; leaving its state to that worker", key, decision.reason)
                self.outbox.drop_job_reports(key)
                folder.journal_done(key)
                continue
            assert decision.state is not None
            state, reason = decision.state, decision.reason
            if decision.action == "ask":
                state, reason = await self._ask_leftover(entry, decision)
            log.warning("reporting job %s from a previous worker run as %s: %s", key, state, reason)
            await self._report_final(key, state)
        # Tries not adopted ended above: their tokens no longer pass the gateway.
        adopted = {r.job.subject for r in self.running.values()}
        for subject in self._leftovers.keys() - adopted:
            self.egress.forget_try(subject)
        self._leftovers.clear()
        self._leftover_states.clear()
        folder.prune_exits()
        if (depth := self.outbox.depth):
            log.info("replaying %d undelivered report(s) from the outbox", depth)
        self.reports.start()

    def admit_leftovers(self) -> int:
        """Let the tries the previous worker process left running use the gateway from its start,
        before registration and :meth:`recover_leftovers` (``crash_policy = adopt`` only).

        Their task processes talk to the gateway's port all along: a state one reports in that
        window reaches the control plane and is journaled (:meth:`note_task_state`), so recovery
        reports it instead of guessing from the exit code. Call before the gateway serves; returns
        how many tries were admitted.
        """
        if self.settings.crash_policy != "adopt":
            return 0
        for entry in self.state_folder.journal_leftovers():
            subject = entry.get("ti_id")
            if not subject or entry.get("elsewhere") or entry.get("waiting"):
                continue
            self._leftovers[str(subject)] = entry["key"]
            self.egress.admit(str(subject), str(entry["key"]))
        if self._leftovers:
            log.info("the gateway serves %d task(s) left by the previous worker run until they are recovered",
                     len(self._leftovers))
        return len(self._leftovers)

    async def _ask_leftover(self, entry: dict[str, Any], decision: recovery.Decision) -> tuple[str, str]:
        """The state to report for a leftover whose own final state the worker never saw, and why:
        what the control plane holds for the try, else ``decision.state`` (failed)."""
        assert decision.state is not None
        job = recovery.job_from_entry(entry) if entry.get("ti_id") else None
        asked = await self._ask_control_plane(job) if job is not None else None
        if asked in TASK_FINAL_STATES:
            return outcome(asked, None).edge_state, f"{decision.reason}; the control plane holds {asked} for it"
        said = f"holds {asked} for it" if asked else "could not be asked"
        return decision.state, f"{decision.reason}; the control plane {said}, so never success"

    async def _ask_outcome(self, run: RunningJob, rc: int) -> None:
        """An adopted job's task process ended and the worker saw no final state of its try (the
        process may have reported it while no worker ran): take the control plane's, else failed."""
        asked = await self._ask_control_plane(run.job)
        if asked in TASK_FINAL_STATES:
            log.warning("job %s: its adopted task process ended (supervisor %s) without a final state seen here; the "
                        "control plane holds %s for it", run.job.key, run.proc.describe_exit(rc) if run.proc else rc, asked)
            run.task_state = asked
        else:
            log.warning("job %s: its adopted task process ended (supervisor %s) without a final state seen here and the "
                        "control plane %s; reporting it failed, never success from an exit code", run.job.key,
                        run.proc.describe_exit(rc) if run.proc else rc,
                        f"holds {asked} for it" if asked else "could not be asked")
            run.task_state = "failed"

    async def _ask_control_plane(self, job: Job) -> str | None:
        """The state the control plane holds for ``job``'s task instance, or None if it cannot say."""
        if job.ti_id is None:
            return None
        k = job.key
        return await self.egress.ask_try_state(job.ti_id, k.dag_id, k.run_id, k.task_id, k.map_index)

    def _adopt(self, entry: dict[str, Any]) -> None:
        """Take over a job whose task process a previous worker process started and that still runs."""
        job = recovery.job_from_entry(entry)
        key, pid = job.key, int(entry["pid"])
        proc = recovery.AdoptedProcess(pid, Path(entry["output"]), self.state_folder.exit_file(key),
                                       entry.get("create_time"))
        running_s = max(0.0, time.time() - float(entry.get("started") or time.time()))
        run = RunningJob(job=job, proc=proc, started=time.monotonic() - running_s, adopted=True,
                         log_offset=int(entry.get("log_offset") or 0), task_state=entry.get("task_state"),
                         devices=self.gpus.claim(key, tuple(entry.get("devices") or ())))
        self.egress.task_server(job)  # ledger rows name the task again
        if isinstance(resume := entry.get("resume"), dict) and job.ti_id is not None:
            self.egress.expect_resume(job.ti_id, Resume(**resume))  # it resumed from a local trigger
        self.running[key] = run
        self.events.job_event(job.queue, "adopted")
        self.counter.set_busy(True)
        # Idempotent on the server; covers a crash between journaling the job and queuing "running".
        self._enqueue(key, "running")
        log.warning("adopted %s (pid %d, running %.0fs) from the previous worker run", key, pid, running_s)
        run.task = asyncio.create_task(self._run(run), name=f"job {key}")

    def _adopt_waiting(self, entry: dict[str, Any]) -> None:
        """Take over a job whose task waited on a local trigger when the previous process crashed."""
        job, deferral = recovery.waiting_job_from_entry(entry)
        key = job.key
        running_s = max(0.0, time.time() - float(entry.get("started") or time.time()))
        run = RunningJob(job=job, started=time.monotonic() - running_s, adopted=True, deferral=deferral, waiting=True,
                         log_offset=int(entry.get("log_offset") or 0), task_state="deferred",
                         devices=self.gpus.claim(key, tuple(entry.get("devices") or ())))
        self.egress.task_server(job)
        self.running[key] = run
        self.events.job_event(job.queue, "adopted")
        self.counter.set_busy(True)
        log.warning("adopted %s, waiting on local trigger %s since %.0fs, from the previous worker run", key,
                    deferral.classpath, time.time() - deferral.since)
        run.task = asyncio.create_task(self._run(run), name=f"job {key}")

    def note_task_state(self, ti_id: str, state: str) -> None:
        """A task process reported ``state`` and the server accepted it: keep it as the job's
        outcome, in memory and in the journal (a restart after a crash reports it too)."""
        for run in self.running.values():
            if run.job.ti_id == ti_id:
                run.task_state = state
                try:
                    self.state_folder.journal_update(run.job.key, task_state=state)
                except OSError as exc:
                    log.error("could not journal the state %s of %s: %s", state, run.job.key, exc)
                return
        if (key := self._leftovers.get(ti_id)) is not None:  # reported before recovery: recovery reads it
            self._leftover_states[ti_id] = state
            try:
                self.state_folder.journal_update(key, task_state=state)
            except OSError as exc:
                log.error("could not journal the state %s of %s: %s", state, key, exc)

    def journal_elsewhere(self, ti_id: str) -> None:
        """Keep in the journal that the server refused this try's start here, so a restart after a
        crash leaves the try to the worker that runs it (see :meth:`_claimed_elsewhere`)."""
        keys = [run.job.key for run in self.running.values() if run.job.ti_id == ti_id][:1]
        if not keys and (key := self._leftovers.get(ti_id)) is not None:
            keys = [key]  # refused before recovery
        for key in keys:
            try:
                self.state_folder.journal_update(key, elsewhere=True)
            except OSError as exc:
                log.error("could not journal that %s runs elsewhere: %s", key, exc)

    async def _expired(self, run: RunningJob, expired_s: float) -> None:
        """The workload's token expired while the job was queued: fail it with the reason, don't run it."""
        key = run.job.key
        self.expired += 1
        reason = (f"the job's execution token expired {expired_s:.0f}s before this worker fetched it (it waited in the "
                  "queue longer than the control plane's [scheduler] task_queued_timeout); not started, reported "
                  "failed so Airflow can retry it")
        log.error("job %s: %s", key, reason)
        self.egress.record_rejected_job(f"token expired in queue: {reason}", str(key))
        if self.settings.log_policy != "none":
            with contextlib.suppress(OutpostError):
                await self.client.logs.push(key, f"outpost: {reason}\n", datetime.now(UTC).isoformat())
        await self._report_final(key, "failed", note="token expired in queue")

    # -- drain -------------------------------------------------------------------------------
    async def drain(self, timeout_s: float, grace_s: float, force: asyncio.Event,
                    after_kill_s: float = AFTER_KILL_WAIT_S) -> None:
        """Wait for running jobs (up to ``timeout_s`` or until ``force``), then SIGTERM, then SIGKILL
        after ``grace_s``, then up to ``after_kill_s`` for the killed tasks' failures to be reported."""
        # Every wait below ends by then: stop_budget_s (what a supervisor's stop timeout must allow) counts it.
        budget_end = time.monotonic() + timeout_s + grace_s + after_kill_s
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            log.info("draining %d job(s) for up to %.0fs", len(tasks), timeout_s)
            await self._wait_any(tasks, timeout_s, force)
        self._stopping = True
        if self.triggers is not None and (stopped := self.triggers.stop_all("the drain timeout passed", refuse_new=True)):
            log.warning("drain timeout: stopped %d local trigger(s); their tasks are reported failed", stopped)
        left = [(r, r.proc) for r in self.running.values()
                if r.proc is not None and not r.waiting and not r.resume_pending and r.proc.returncode is None]
        if left:
            log.warning("drain timeout: sending SIGTERM to %d task(s), SIGKILL after %.0fs", len(left), grace_s)
            for _, proc in left:
                proc.signal(signal.SIGTERM)  # the Task SDK supervisor forwards it to its task
            await self._wait_any([r.task for r, _ in left if r.task], grace_s, None)
            still = [(r, r.proc) for r in self.running.values() if r.proc is not None and r.proc.returncode is None]
            for r, proc in still:
                log.warning("SIGKILL %s (pid %d)", r.job.key, proc.pid)
                proc.kill_task_tree()  # the supervisor reports the failure, then exits
            await self._wait_any([r.task for r, _ in still if r.task], after_kill_s, None)
            for r in self.running.values():
                if r.proc is not None:
                    r.proc.signal(signal.SIGKILL, group=True)
        # Every job task reports its final state (failed when killed) before the worker goes offline.
        remaining = [r.task for r in self.running.values() if r.task is not None]
        if remaining:  # pushing their last logs, queuing their final states: the rest of the budget
            await asyncio.wait(remaining, timeout=max(after_kill_s, budget_end - time.monotonic()))
        if self._background:
            await asyncio.wait(list(self._background), timeout=30)

    @staticmethod
    async def _wait_any(tasks: list[asyncio.Task[None]], timeout_s: float, force: asyncio.Event | None) -> None:
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(tasks))}
        if force is not None:
            waiters.add(asyncio.ensure_future(force.wait()))
        done, pending = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()
