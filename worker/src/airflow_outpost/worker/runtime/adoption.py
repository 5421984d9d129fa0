"""What a restarted worker does with the jobs its previous process left in the journal.

:mod:`.recovery` decides per journal entry (pure); :class:`Adoption` carries the decisions out on
the :class:`~.job_table.JobTable`: it admits the previous run's tries to the gateway before it
serves (``crash_policy = adopt``), keeps the states they report in that window, then reports,
stops, leaves or adopts each entry. When a try's own final state is unknown it asks the control
plane for it and never infers success from an exit code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.egress.gateway import Resume
from airflow_outpost.worker.runtime import recovery
from airflow_outpost.worker.runtime.job_table import RunningJob
from airflow_outpost.worker.runtime.outcome import TASK_FINAL_STATES, outcome
from airflow_outpost.worker.runtime.state import read_exit

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.jobs import Job, JobKey
    from airflow_outpost.worker.edge.request_counter import RequestCounter
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.hosted.gpu import GpuAllocator
    from airflow_outpost.worker.runtime.job_table import JobEvents, JobTable
    from airflow_outpost.worker.runtime.outbox import Outbox
    from airflow_outpost.worker.runtime.state import StateFolder

log = logging.getLogger(__name__)


class Adoption:
    """Recovery of the previous worker process's jobs into ``table``.

    ``start(run)`` starts watching an adopted job (its task process runs already); ``enqueue(key,
    state)`` queues a report and ``report_final(key, state)`` a final one (the journal entry is then
    done). ``local_triggers``: whether jobs that waited on a local trigger can be adopted.
    """

    def __init__(self, settings: Settings, *, table: JobTable, state_folder: StateFolder, egress: Egress,
                 outbox: Outbox, gpus: GpuAllocator, events: JobEvents, counter: RequestCounter,
                 local_triggers: bool, start: Callable[[RunningJob], None],
                 enqueue: Callable[[JobKey, str], None], report_final: Callable[[JobKey, str], Awaitable[None]]) -> None:
        self.settings = settings
        self.table = table
        self.state_folder = state_folder
        self.egress = egress
        self.outbox = outbox
        self.gpus = gpus
        self.events = events
        self.counter = counter
        self.local_triggers = local_triggers
        self.start = start
        self.enqueue = enqueue
        self.report_final = report_final
        # Tries of the previous worker process the gateway serves before recovery (see admit):
        # token subject (task instance or callback id) -> job key, until recover has run.
        self._leftovers: dict[str, JobKey] = {}
        self._leftover_states: dict[str, str] = {}  # the states they reported meanwhile (also journaled)

    def admit(self) -> int:
        """Let the tries the previous worker process left running use the gateway from its start,
        before registration and :meth:`recover` (``crash_policy = adopt`` only).

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

    async def recover(self) -> None:
        """Report, stop and report failed, leave to another worker, or adopt each journal entry of
        the previous process (see :mod:`airflow_outpost.worker.runtime.recovery`). Call once, with the
        outbox open, before fetching work."""
        folder, policy = self.state_folder, self.settings.crash_policy
        for entry in folder.journal_leftovers():
            key: JobKey = entry["key"]
            if (noted := self._leftover_states.get(str(entry.get("ti_id")))) is not None:
                entry["task_state"] = noted  # reported while an earlier entry was recovered
            decision = recovery.decide(
                entry, final_state=entry.get("final_state") or self.outbox.final_state(key),
                exit_code=read_exit(folder.exit_file(key)),
                alive=recovery.is_our_process(entry.get("pid"), entry.get("create_time")),
                policy=policy, gateway_url=self.egress.url, local_triggers=self.local_triggers,
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
            await self.report_final(key, state)
        # Tries not adopted ended above: their tokens no longer pass the gateway.
        adopted = {r.job.subject for r in self.table.running.values()}
        for subject in self._leftovers.keys() - adopted:
            self.egress.forget_try(subject)
        self._leftovers.clear()
        self._leftover_states.clear()
        folder.prune_exits()

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

    async def ask_outcome(self, run: RunningJob, rc: int) -> None:
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
        self.table.running[key] = run
        self.events.job_event(job.queue, "adopted")
        self.counter.set_busy(True)
        # Idempotent on the server; covers a crash between journaling the job and queuing "running".
        self.enqueue(key, "running")
        log.warning("adopted %s (pid %d, running %.0fs) from the previous worker run", key, pid, running_s)
        self.start(run)

    def _adopt_waiting(self, entry: dict[str, Any]) -> None:
        """Take over a job whose task waited on a local trigger when the previous process crashed."""
        job, deferral = recovery.waiting_job_from_entry(entry)
        key = job.key
        running_s = max(0.0, time.time() - float(entry.get("started") or time.time()))
        run = RunningJob(job=job, started=time.monotonic() - running_s, adopted=True, deferral=deferral, waiting=True,
                         log_offset=int(entry.get("log_offset") or 0), task_state="deferred",
                         devices=self.gpus.claim(key, tuple(entry.get("devices") or ())))
        self.egress.task_server(job)
        self.table.running[key] = run
        self.events.job_event(job.queue, "adopted")
        self.counter.set_busy(True)
        log.warning("adopted %s, waiting on local trigger %s since %.0fs, from the previous worker run", key,
                    deferral.classpath, time.time() - deferral.since)
        self.start(run)

    def note_task_state(self, ti_id: str, state: str) -> None:
        """A task process reported ``state`` and the server accepted it: keep it as the job's
        outcome, in memory and in the journal (a restart after a crash reports it too)."""
        if (run := self.table.by_ti(ti_id)) is not None:
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
        crash leaves the try to the worker that runs it (see ``JobRunner``'s claimed-elsewhere)."""
        keys = [run.job.key] if (run := self.table.by_ti(ti_id)) is not None else []
        if not keys and (key := self._leftovers.get(ti_id)) is not None:
            keys = [key]  # refused before recovery
        for key in keys:
            try:
                self.state_folder.journal_update(key, elsewhere=True)
            except OSError as exc:
                log.error("could not journal that %s runs elsewhere: %s", key, exc)
