"""Runs fetched jobs: validate, launch a task process, report running, wait, report the outcome.

Every claimed job is journaled in the state folder (with its task process's pid) before it
starts. Every report the worker owes the control plane goes to the durable outbox
(:mod:`airflow_outpost.worker.runtime.outbox`) first; one sender delivers it in order and removes it only once the server
acknowledged it, retrying through outages and replaying what is left at the next start, so a
finished task's state is never dropped. The journal entry is removed once the job's final state
is in the outbox. After a crash, :meth:`JobRunner.recover_leftovers` reports, stops or (with
``crash_policy = adopt``) takes over the jobs the previous process left (:mod:`.adoption`).

A job whose workload token expired while it waited in the queue is not started: it is reported
failed (Airflow retries it), with the reason in the worker log, the task log and the ledger.

The runner's parts share the :class:`~.job_table.JobTable`: :mod:`.adoption` (the previous
process's jobs), :mod:`.trigger_waits` (tasks waiting on a local trigger) and :mod:`.drain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.config import AFTER_KILL_WAIT_S
from airflow_outpost.worker.edge.jobs import JobKey, RejectedJob, parse_job, resolve_inside
from airflow_outpost.worker.edge.tokens import expired_for
from airflow_outpost.worker.errors import JobRejected, LaunchTimeoutError, OutpostError
from airflow_outpost.worker.hosted.costs import live_tasks
from airflow_outpost.worker.processes.launcher import TaskLauncher
from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.runtime.adoption import Adoption
from airflow_outpost.worker.runtime.drain import drain_jobs
from airflow_outpost.worker.runtime.job_table import JobEvents, JobTable, RunningJob
from airflow_outpost.worker.runtime.outbox import Outbox
from airflow_outpost.worker.runtime.outcome import TASK_FINAL_STATES, outcome
from airflow_outpost.worker.runtime.reports import ReportSender
from airflow_outpost.worker.runtime.task_logs import LogShipper
from airflow_outpost.worker.runtime.trigger_waits import TriggerWaits
from airflow_outpost.worker.triggers.host import LocalTriggers, WaitEnd

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

log = logging.getLogger(__name__)


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
        self.table = JobTable(link)
        self.running = self.table.running  # the same dict: the worker and observers read it
        self.outbox = Outbox(settings.state_folder / "outbox.sqlite")
        # Delivers the outbox (job states, then the worker's own) to the control plane, in order.
        self.logs = LogShipper(settings, client=client, egress=egress, state_folder=state_folder, outbox=self.outbox)
        self.reports = ReportSender(self.outbox, client=client, settings=settings, link=link, sysinfo=sysinfo,
                                    before_final=self.logs.ship_pending)  # a job's log goes before its final state
        self.adoption = Adoption(settings, table=self.table, state_folder=state_folder, egress=egress, outbox=self.outbox,
                                 gpus=gpus, events=events, counter=counter, local_triggers=triggers is not None,
                                 start=self._start_watching, enqueue=self._enqueue, report_final=self._report_final)
        self.waits: TriggerWaits | None = (
            TriggerWaits(settings, triggers=triggers, table=self.table, egress=egress, state_folder=state_folder,
                         logs=self.logs, on_slot_freed=on_slot_freed, start_process=self._start_process,
                         report_final=self._report_final, claimed_elsewhere=self._claimed_elsewhere)
            if triggers is not None else None)
        self.expired = 0  # jobs whose token expired in the queue
        self.rejected = 0
        self._fetch_turn = 0
        # Finished jobs by workload kind ("task", "callback") and final state, for `outpost status`.
        self.finished: dict[str, dict[str, int]] = {}

    @property
    def free_slots(self) -> int:
        return self.table.free_slots

    @property
    def waiting(self) -> int:
        """Jobs whose task waits on a local trigger."""
        return self.table.waiting

    def describe(self) -> list[dict[str, Any]]:
        return self.table.describe()

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
        self._start_watching(run)
        return True

    def _start_watching(self, run: RunningJob) -> None:
        """Run ``run`` to its end in a task of its own (launch, wait, report; see ``_run``)."""
        run.task = asyncio.create_task(self._run(run), name=f"job {run.job.key}")

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
                        await self.adoption.ask_outcome(run, rc)
                    result = outcome(run.task_state, rc)
                    if result.state != "deferred" or run.deferral is None or self.waits is None:
                        state = result.state
                        await self._finish(run, rc, result.edge_state)
                        return
                    await self.logs.push(run)
                assert self.waits is not None  # a deferral is kept (or adopted) only with triggers = local
                end = await self.waits.wait(run)
                if end.kind in ("resume", "fail") and await self.waits.resume(run, end):
                    continue
                if end.kind in ("resume", "fail"):
                    end = WaitEnd("stopped", error="the drain timeout passed before it could resume")
                state = await self.waits.end_wait(run, end)
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

    # -- local triggers (see trigger_waits) ------------------------------------------------
    def note_deferral(self, ti_id: str, body: bytes, authorization: str | None) -> bool:
        """A task of ours defers (``triggers = local``): keep the deferral here; False to let it
        go to the control plane (not our task, or its start was not seen by this worker)."""
        return self.waits is not None and self.waits.note_deferral(ti_id, body, authorization)

    def note_token(self, ti_id: str, token: str) -> None:
        """The server refreshed a waiting try's token: journal it (a restart resumes with it)."""
        if self.waits is not None:
            self.waits.note_token(ti_id, token)

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

    # -- the previous process's jobs (see adoption) -------------------------------------------
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
        await self.adoption.recover()
        if (depth := self.outbox.depth):
            log.info("replaying %d undelivered report(s) from the outbox", depth)
        self.reports.start()

    def admit_leftovers(self) -> int:
        """Let the previous run's tries use the gateway before recovery (see :meth:`Adoption.admit`)."""
        return self.adoption.admit()

    def note_task_state(self, ti_id: str, state: str) -> None:
        """A task process reported ``state`` and the server accepted it (see :meth:`Adoption.note_task_state`)."""
        self.adoption.note_task_state(ti_id, state)

    def journal_elsewhere(self, ti_id: str) -> None:
        """The server refused this try's start here (see :meth:`Adoption.journal_elsewhere`)."""
        self.adoption.journal_elsewhere(ti_id)

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
        after ``grace_s``, then up to ``after_kill_s`` for the killed tasks' failures to be reported
        (see :func:`~.drain.drain_jobs`)."""
        await drain_jobs(self.table, timeout_s, grace_s, force, after_kill_s, triggers=self.triggers)
