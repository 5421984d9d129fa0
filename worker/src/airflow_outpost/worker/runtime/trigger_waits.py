"""Jobs whose task deferred to a trigger on this worker (``triggers = local``): the bookkeeping
of the wait and of the resume.

:class:`TriggerWaits` keeps a deferral the gateway intercepted with its job (and in the journal, so
a restart resumes it), frees the job's slot while the trigger runs, takes a slot again when the
trigger ends (first come, first served) and starts the try again in a new task process with
Airflow's resume semantics, or ends the job when the trigger ended the task, the try went away or
the worker stops (README "In-region triggers").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.egress.gateway import Resume
from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.triggers.host import Deferral, ResumeQueue, WaitEnd

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.jobs import JobKey
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.runtime.job_table import JobTable, RunningJob
    from airflow_outpost.worker.runtime.state import StateFolder
    from airflow_outpost.worker.runtime.task_logs import LogShipper
    from airflow_outpost.worker.triggers.host import LocalTriggers

log = logging.getLogger(__name__)


class TriggerWaits:
    """The local-trigger side of the jobs in ``table``.

    ``start_process(run, workload)`` starts a task process for a resume and returns its gateway
    URL; ``report_final(key, state)`` queues a job's final state; ``claimed_elsewhere(run)``
    leaves a try the server runs elsewhere to that worker; ``on_slot_freed`` wakes the main loop.
    """

    def __init__(self, settings: Settings, *, triggers: LocalTriggers, table: JobTable, egress: Egress,
                 state_folder: StateFolder, logs: LogShipper, on_slot_freed: Callable[[], None],
                 start_process: Callable[[RunningJob, dict[str, Any]], Awaitable[str]],
                 report_final: Callable[[JobKey, str], Awaitable[None]],
                 claimed_elsewhere: Callable[[RunningJob], None]) -> None:
        self.settings = settings
        self.triggers = triggers
        self.table = table
        self.egress = egress
        self.state_folder = state_folder
        self.logs = logs
        self.on_slot_freed = on_slot_freed
        self.start_process = start_process
        self.report_final = report_final
        self.claimed_elsewhere = claimed_elsewhere
        self._resumes = ResumeQueue()  # tries whose trigger ended, in the order they wait for a slot

    def note_deferral(self, ti_id: str, body: bytes, authorization: str | None) -> bool:
        """A task of ours defers: keep the deferral here; False to let it go to the control plane
        (not our task, or its start was not seen by this worker)."""
        run = self.table.by_ti(ti_id)
        if run is None:
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
        for run in self.table.running.values():
            if run.job.ti_id == ti_id and run.deferral is not None:
                with contextlib.suppress(OSError):
                    self.state_folder.journal_update(run.job.key, deferral=run.deferral.to_json())
                return

    async def wait(self, run: RunningJob) -> WaitEnd:
        """Free the job's slot while its trigger runs on this worker; how the wait ended."""
        assert run.deferral is not None
        run.waiting = True
        self.on_slot_freed()  # the main loop fetches at once: the slot is free for other tasks
        ended = self.triggers.wait(run.deferral, adopted=run.adopted and run.proc is None)
        log.info("job %s waits on local trigger %s (%d waiting)", run.job.key, run.deferral.classpath, self.table.waiting)
        try:
            while True:
                done, _ = await asyncio.wait({ended}, timeout=self.settings.poll_interval_s * 2)
                await self.logs.push(run)  # what the trigger logs goes to the task's log
                if done:
                    return ended.result()
        finally:
            run.waiting = False  # its slot is taken again (by resume, or freed when the job ends)

    async def resume(self, run: RunningJob, end: WaitEnd) -> bool:
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
        server = await self.start_process(run, workload)
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
        table = self.table
        if run.devices:
            return not table.stopping  # a GPU job kept its devices while it waited
        run.resume_pending = True
        try:
            return await self._resumes.take(run.job.key, run.job.concurrency_slots, lambda: table.link.concurrency,
                                            table.slots_taken_by_runners, give_up=lambda: table.stopping)
        finally:
            run.resume_pending = False

    async def end_wait(self, run: RunningJob, end: WaitEnd) -> str:
        """A wait that resumes nothing: the trigger ended the task, the try went away, or the worker
        stops. Returns the state the job is counted as."""
        key = run.job.key
        if end.kind == "task_end" and run.deferral is not None and end.state is not None:
            state = await self.triggers.end_task(run.deferral, run.job.key, end.state, end.xcoms)
            if state is not None:
                log.info("job %s: its local trigger ended the task as %s", key, state)
                await self.logs.push(run, final=True)
                await self.report_final(key, "success" if state != "failed" else "failed")
                return state
            end = WaitEnd("gone", error="the control plane refused the state the trigger set")
        if end.kind == "gone" and run.job.ti_id in self.egress.start_refused:
            self.egress.start_refused.discard(run.job.ti_id)
            self.claimed_elsewhere(run)  # the server says another worker runs this try: not ours to fail
            return "elsewhere"
        if end.kind == "gone":
            log.warning("job %s: the control plane no longer runs this try (%s); its trigger stopped", key, end.error)
        else:
            log.warning("job %s: its wait on a local trigger was stopped (%s); reporting it failed", key, end.error)
        await self.logs.push(run, final=True)
        await self.report_final(key, "failed")
        return "failed"
