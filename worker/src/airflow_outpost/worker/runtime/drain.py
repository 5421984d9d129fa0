"""Draining the running jobs at shutdown, in two phases with an escalation.

:func:`drain_jobs` waits for the jobs of a :class:`~.job_table.JobTable` (up to the drain timeout
or until ``force``), then stops local triggers, sends SIGTERM, SIGKILL after the grace, and waits
for every job's task to queue its final state (failed when killed) before the worker goes offline.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_outpost.worker.runtime.job_table import JobTable
    from airflow_outpost.worker.triggers.host import LocalTriggers

log = logging.getLogger(__name__)


async def drain_jobs(table: JobTable, timeout_s: float, grace_s: float, force: asyncio.Event, after_kill_s: float, *,
                     triggers: LocalTriggers | None) -> None:
    """Wait for running jobs (up to ``timeout_s`` or until ``force``), then SIGTERM, then SIGKILL
    after ``grace_s``, then up to ``after_kill_s`` for the killed tasks' failures to be reported.
    Sets ``table.stopping`` once the first wait is over: no local-trigger wait resumes after it."""
    # Every wait below ends by then: stop_budget_s (what a supervisor's stop timeout must allow) counts it.
    budget_end = time.monotonic() + timeout_s + grace_s + after_kill_s
    tasks = [r.task for r in table.running.values() if r.task is not None]
    if tasks:
        log.info("draining %d job(s) for up to %.0fs", len(tasks), timeout_s)
        await _wait_any(tasks, timeout_s, force)
    table.stopping = True
    if triggers is not None and (stopped := triggers.stop_all("the drain timeout passed", refuse_new=True)):
        log.warning("drain timeout: stopped %d local trigger(s); their tasks are reported failed", stopped)
    left = [(r, r.proc) for r in table.running.values()
            if r.proc is not None and not r.waiting and not r.resume_pending and r.proc.returncode is None]
    if left:
        log.warning("drain timeout: sending SIGTERM to %d task(s), SIGKILL after %.0fs", len(left), grace_s)
        for _, proc in left:
            proc.signal(signal.SIGTERM)  # the Task SDK supervisor forwards it to its task
        await _wait_any([r.task for r, _ in left if r.task], grace_s, None)
        still = [(r, r.proc) for r in table.running.values() if r.proc is not None and r.proc.returncode is None]
        for r, proc in still:
            log.warning("SIGKILL %s (pid %d)", r.job.key, proc.pid)
            proc.kill_task_tree()  # the supervisor reports the failure, then exits
        await _wait_any([r.task for r, _ in still if r.task], after_kill_s, None)
        for r in table.running.values():
            if r.proc is not None:
                r.proc.signal(signal.SIGKILL, group=True)
    # Every job task reports its final state (failed when killed) before the worker goes offline.
    remaining = [r.task for r in table.running.values() if r.task is not None]
    if remaining:  # pushing their last logs, queuing their final states: the rest of the budget
        await asyncio.wait(remaining, timeout=max(after_kill_s, budget_end - time.monotonic()))


async def _wait_any(tasks: list[asyncio.Task[None]], timeout_s: float, force: asyncio.Event | None) -> None:
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(tasks))}
    if force is not None:
        waiters.add(asyncio.ensure_future(force.wait()))
    done, pending = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
