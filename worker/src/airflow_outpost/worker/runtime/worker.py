"""The worker: registers with the control plane, heartbeats, fetches jobs and runs them.

Lifecycle: ``await Worker(settings).run()`` returns the exit code once the worker has drained
and reported itself offline. ``shutdown()`` (from a signal handler or a test) stops fetching
and drains: running tasks may finish for ``drain_timeout_s``, then get SIGTERM, then SIGKILL
after ``kill_grace_s``; every task's final state is reported. A second ``shutdown()`` (or
``shutdown(force=True)``) skips the wait. ``shutdown()`` is safe before ``run()`` and twice.

Polling is adaptive: after a fetch returned work, or when a slot frees, the worker fetches again
at once; for half a second after one of its tasks reported success, failed or skipped it polls
every :func:`quick_poll_s`; while nothing arrives it backs off with jitter from
``poll_min_interval_s`` to ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from airflow_outpost.worker.config import (
    OFFLINE_FLUSH_S,
    PREEMPTION_KILL_GRACE_S,
    PREEMPTION_WAIT_S,
    Settings,
    without_credentials,
)
from airflow_outpost.worker.edge.client import EdgeClient
from airflow_outpost.worker.edge.request_counter import RequestCounter
from airflow_outpost.worker.edge.sysinfo import sysinfo
from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.hosted.costs import BudgetGuard, CostLedger, live_tasks
from airflow_outpost.worker.hosted.gpu import GpuAllocator, detect_gpus
from airflow_outpost.worker.hosted.model_host import ModelHost, service_available
from airflow_outpost.worker.hosted.ray_host import RayHost, ray_available
from airflow_outpost.worker.observability.health import HealthServer
from airflow_outpost.worker.observability.prometheus import WorkerMetrics, WorkerSnapshot
from airflow_outpost.worker.processes.launcher import TaskLauncher
from airflow_outpost.worker.runtime.heartbeat import Heartbeat
from airflow_outpost.worker.runtime.job_runner import JobRunner
from airflow_outpost.worker.runtime.lifecycle import Lifecycle
from airflow_outpost.worker.runtime.link import ControlPlaneLink
from airflow_outpost.worker.runtime.loop_steps import DiskSpace, LoopSteps
from airflow_outpost.worker.runtime.registration import register
from airflow_outpost.worker.runtime.state import StateFolder
from airflow_outpost.worker.runtime.status_file import MemoryMergeStatus, StatusWriter
from airflow_outpost.worker.runtime.task_env import model_service_ids, task_env
from airflow_outpost.worker.triggers.host import WAIT_HEARTBEAT_MAX_S, WAIT_HEARTBEAT_S, LocalTriggers

log = logging.getLogger(__name__)

# Exit codes of a clean stop, besides 0 (a signal, or a shutdown request from the control plane):
# the wrapper of a rented machine powers it off on these, not after an operator's stop.
EXIT_IDLE = 3  # exit_when_idle_s passed without work
EXIT_PREEMPTED = 4  # drained after a preemption notice

# After one of our tasks reports one of these, the scheduler may queue downstream work at once.
FINAL_TASK_STATES = frozenset({"success", "failed", "skipped"})
QUICK_POLL_WINDOW_S = 0.5
QUICK_POLL_FACTOR = 0.4
QUICK_POLL_FLOOR_S = 0.02  # a tiny poll_min_interval_s must not turn the window into a flood of fetches


def quick_poll_s(poll_min_interval_s: float) -> float:
    """The poll interval in the window after a final state: 0.4 x ``poll_min_interval_s``, never
    below 20 ms."""
    return max(QUICK_POLL_FLOOR_S, poll_min_interval_s * QUICK_POLL_FACTOR)


class Worker:
    """One outpost worker process: the composition root. See the module docstring for the lifecycle.

    Every part is built here and given what it needs (a few values, callbacks, the link); none
    of them sees the ``Worker``. ``run()`` declares start order once; shutdown is its reverse.
    ``transport`` replaces the HTTP transport to the control plane (tests).
    """

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.counter = RequestCounter()
        self.link = ControlPlaneLink(queues=list(settings.queues) if settings.queues else None,
                                     concurrency=settings.concurrency)
        # Policy, ledger and the task processes' gateway. Told of refused starts (journaled by the
        # job runner) and of held task requests that got through (the worker then heartbeats).
        self.egress = Egress(settings, on_start_refused=lambda ti_id: self.jobs.journal_elsewhere(ti_id),
                             on_upstream_back=self._control_plane_seen,
                             on_task_state=self._task_state_reported,
                             on_deferral=lambda ti_id, body, auth: self.jobs.note_deferral(ti_id, body, auth))
        self.client = EdgeClient(settings, counter=self.counter, transport=transport, recorder=self.egress.record_edge)
        self._heartbeat_due = False
        self.state_folder = StateFolder(settings.state_folder)
        self.draining = False
        self.started_at = datetime.now(UTC)
        self._force = asyncio.Event()
        self._wake = asyncio.Event()
        self._quick_polls_until = 0.0  # see _task_state_reported
        self._previous_status: dict | None = None
        self.gpus = GpuAllocator(detect_gpus(settings.gpus), settings.gpu_queues)
        self.costs = CostLedger(self.state_folder.root / "costs.sqlite", settings.budgets)
        self.budgets = BudgetGuard(self.costs)
        self.lifecycle = Lifecycle(settings, running=lambda: len(self.jobs.running), shutdown=self.shutdown,
                                   task_env=self._task_env)
        # A model service the worker owns, unless the runners are absent or one is configured.
        self.models: ModelHost | None = (
            ModelHost(settings.state_folder, idle_s=settings.model_idle_s, **model_service_ids(settings))
            if settings.model_service and service_available() and not os.environ.get("OUTPOST_MODEL_SOCKET") else None)
        # The Ray tasks use: a head the worker owns (ray = local), an existing cluster, or None
        # (each task starts its own).
        self.ray: RayHost | None = RayHost.from_settings(settings)
        if self.ray is not None and self.ray.local and not ray_available():
            log.error("ray = local needs Ray in this interpreter (the runners extra); tasks start their own Ray")
            self.ray = None
        self.telemetry = WorkerMetrics(self.snapshot, costs=self.costs, budgets=self.budgets,
                                       runner_dir=settings.state_folder / "runner-metrics" if settings.metrics_port else None)
        # Each main-loop step is contained: logged, counted, retried with backoff (never ends run()).
        self.steps = LoopSteps(self.telemetry.loop_error)
        self.disk = DiskSpace(self.state_folder.root)
        self._signed_off = False
        self.health: HealthServer | None = (
            HealthServer(settings.metrics_host, settings.metrics_port, readiness=self.readiness,
                         metrics=self.telemetry.render) if settings.metrics_port else None)
        self.launcher = TaskLauncher(output_dir=self.state_folder.output_dir, prewarm=settings.prewarm,
                                     preload=settings.preload, memory_merge=settings.memory_merge,
                                     crash_policy=settings.crash_policy, task_user=settings.task_user)
        # triggers = local: deferred tasks wait here, in a trigger runner child (README "In-region triggers").
        self.triggers: LocalTriggers | None = (
            LocalTriggers(max_waiting=settings.max_local_triggers, gateway_url=lambda: self.egress.url,
                          env=lambda: without_credentials(self._task_env()),
                          stderr_path=self.state_folder.root / "trigger-runner.log",
                          on_token=lambda ti_id, token: self.jobs.note_token(ti_id, token),
                          heartbeat_s=min(max(settings.heartbeat_interval_s, WAIT_HEARTBEAT_S), WAIT_HEARTBEAT_MAX_S))
            if settings.triggers == "local" else None)
        self.jobs = JobRunner(settings, client=self.client, egress=self.egress, launcher=self.launcher,
                              state_folder=self.state_folder, link=self.link, gpus=self.gpus, counter=self.counter,
                              events=self.telemetry, costs=self.costs, budgets=self.budgets, ray=self.ray,
                              sysinfo=self._sysinfo, on_slot_freed=self.wake, triggers=self.triggers)
        self.heartbeat = Heartbeat(settings, client=self.client, link=self.link, state=self.worker_state,
                                   jobs_active=lambda: len(self.jobs.running), sysinfo=self._sysinfo,
                                   budget_note=self.budgets.note, draining=lambda: self.draining, shutdown=self.shutdown,
                                   on_back=self._control_plane_back)
        self.status = StatusWriter(self.state_folder, self.disk, self._status_fields)
        self.merge_status = MemoryMergeStatus(self._task_pids)

    # -- public lifecycle ------------------------------------------------------------------
    def shutdown(self, *, force: bool = False) -> None:
        """Stop fetching and drain; a second call (or ``force``) skips the drain wait."""
        if self.draining or force:
            self._force.set()
        if not self.draining:
            log.info("shutdown requested: no new jobs; draining %d running job(s)", len(self.jobs.running))
        self.draining = True
        self._wake.set()

    async def run(self) -> int:
        """Run until shut down; return the process exit code: 0 after a clean drain,
        ``idle_exit_code`` (``EXIT_IDLE``, 3, by default) after ``exit_when_idle_s``, ``EXIT_PREEMPTED`` (4) after a preemption notice.

        Start order is declared once, below; each part's close is pushed as it starts, so what
        started last stops first, whichever step fails. Undelivered reports stay in the outbox
        for the next start.
        """
        async with contextlib.AsyncExitStack() as stack:
            self.state_folder.acquire()
            stack.callback(self.state_folder.release)
            # Read before the first write: it tells whether the previous run crashed.
            self._previous_status = self.state_folder.read_status()
            stack.callback(lambda: self.status.write_final(self._signed_off))
            # Before the launcher: task processes get the gateway's URL. On the previous run's port and
            # prefix if possible, which task processes that outlived it (crash_policy adopt) still use.
            stack.push_async_callback(self.egress.aclose)
            # crash_policy adopt: the previous run's tries may use the gateway from its first request.
            self.jobs.admit_leftovers()
            await self.egress.start()  # on the address recorded in the state folder, if it can be trusted
            if self.triggers is not None:  # its heartbeats go through the gateway: closed before it
                stack.push_async_callback(self.triggers.aclose)
            stack.push_async_callback(self.client.aclose)
            # Stops the outbox sender before the client it sends with closes.
            stack.push_async_callback(self.jobs.aclose)
            stack.callback(self.costs.close)
            if self.health is not None:
                stack.push_async_callback(self.health.aclose)
                await self.health.start()
            stack.push_async_callback(self.launcher.aclose)
            await self.launcher.start(self._task_env())
            if self.models is not None:
                stack.push_async_callback(self.models.aclose)
                await self.models.start(self._task_env())
            if self.ray is not None:
                stack.push_async_callback(self.ray.aclose)
                await self.ray.start(without_credentials(self._task_env()))
            await register(self.settings, client=self.client, link=self.link, gpus=self.gpus, sysinfo=self._sysinfo,
                           previous_status=self._previous_status)
            # Both come up while the zygote imports Airflow. Tasks started before a service is
            # ready would do without it (load their model, start their own Ray).
            await asyncio.gather(*([self.models.wait_ready()] if self.models is not None else []),
                                 *([self.ray.wait_ready()] if self.ray is not None else []))
            stack.push_async_callback(self.lifecycle.aclose)
            self.lifecycle.start_warming()
            await self.jobs.recover_leftovers()
            await self._main_loop()
            preempted = self.lifecycle.preempted_now()
            if preempted:  # the cloud's clock: a shorter grace and shorter waits (see config)
                await self.jobs.drain(self.lifecycle.drain_timeout_s(),
                                      min(self.settings.kill_grace_s, PREEMPTION_KILL_GRACE_S), self._force,
                                      after_kill_s=PREEMPTION_WAIT_S)
            else:
                await self.jobs.drain(self.lifecycle.drain_timeout_s(), self.settings.kill_grace_s, self._force)
            await self._go_offline(PREEMPTION_WAIT_S if preempted else OFFLINE_FLUSH_S)
        return EXIT_PREEMPTED if preempted else self.settings.idle_exit_code if self.lifecycle.exited_idle else 0

    # -- environment for tasks ---------------------------------------------------------------
    def _task_env(self) -> dict[str, str]:
        runner = self.telemetry.runner
        return task_env(self.settings, egress=self.egress, metrics_dir=runner.folder if runner is not None else None,
                        models=self.models, ray=self.ray)

    # -- main loop ---------------------------------------------------------------------------
    async def _main_loop(self) -> None:
        s = self.settings
        delay = s.poll_min_interval_s
        next_hb = 0.0
        next_rate_log = time.monotonic() + 60
        while not self.draining:
            # Cleared here, not when the loop goes to sleep: a slot freed (or a final state) while
            # this iteration awaited the server still cuts the coming wait short.
            self._wake.clear()
            now = time.monotonic()
            if now >= next_hb or self._heartbeat_due:
                self._heartbeat_due = False
                ok = await self.steps.run("heartbeat", self.heartbeat.beat, default=False)
                next_hb = now + (s.heartbeat_interval_s if ok else min(s.heartbeat_interval_s, self._outage_delay()))
            if now >= next_rate_log:
                log.info("control-plane requests/s: %s", self.counter.rates())
                next_rate_log = now + 60
            self.steps.call("lifecycle", self.lifecycle.tick, None)
            self.steps.call("maintenance", self._apply_local_maintenance, None)
            self.steps.call("budgets", lambda: self.budgets.refresh(live_tasks(list(self.jobs.running.values()))), None)
            self.steps.call("disk", self.disk.check, None)
            got = False
            if self._may_fetch():
                got = await self.steps.run("fetch", self.jobs.fetch_one, default=False)
            self.steps.call("status", self.status.write, None)
            if got:
                delay = s.poll_min_interval_s
                self._quick_polls_until = 0.0  # what the quick polls waited for came
                continue  # more work may be queued: ask again at once
            until_hb = max(0.0, next_hb - time.monotonic())
            quick = time.monotonic() < self._quick_polls_until
            # In the window the wait is the quick interval itself, whatever the back-off says.
            timeout = min(quick_poll_s(s.poll_min_interval_s) if quick else delay, until_hb)
            woken = await self._sleep(timeout)
            if woken or quick:
                # A slot freed, or a final state came in: downstream work is likely queued soon
                # (after the quick polls, the back-off starts again from the minimum).
                delay = s.poll_min_interval_s
            else:
                delay = min(s.poll_interval_s, delay * 1.5) * random.uniform(0.8, 1.0)
                delay = max(delay, s.poll_min_interval_s)

    def _task_state_reported(self, ti_id: str, state: str) -> None:
        """One of our tasks reported ``state`` and the server accepted it.

        A final state is when the scheduler queues the task's downstream tasks, 0.1-0.2 s later;
        the Edge API has no way to wait for a job, so for ``QUICK_POLL_WINDOW_S`` the worker polls
        every :func:`quick_poll_s` (40 ms by default) instead of backing off, until a fetch returns
        work: a chain's next task is picked up within about that (benchmarks/README.md, "Where the
        chain's time goes"). An idle worker polls no more often than before.
        """
        if state in FINAL_TASK_STATES:
            self._quick_polls_until = time.monotonic() + QUICK_POLL_WINDOW_S
            self._wake.set()  # the loop may be in a long idle wait
        self.jobs.note_task_state(ti_id, state)

    def _may_fetch(self) -> bool:
        return (not self.draining and not self.link.maintenance and self.link.disconnected_since is None
                and not self.disk.full
                and (self.jobs.free_slots > 0 or self.gpus.free > 0))

    async def _sleep(self, timeout: float) -> bool:
        """Sleep up to ``timeout``; return True if woken early (slot freed, final state, shutdown),
        or if that happened since the main loop's iteration began."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def wake(self) -> None:
        self._wake.set()

    def _control_plane_seen(self) -> None:
        """A task request got through while we count the control plane as away: heartbeat now."""
        if self.link.disconnected_since is not None:
            self._heartbeat_due = True
            self._wake.set()

    def _control_plane_back(self) -> None:
        """A heartbeat got through after an outage: send what waits now, not after its backoff."""
        self.jobs.reports.wake()
        self.egress.control_plane_back()  # held task requests retry now, not after their backoff

    def _outage_delay(self) -> float:
        down = time.monotonic() - (self.link.disconnected_since or time.monotonic())
        # Probe at most every 5 s: one cheap request, and a recovery is noticed within seconds.
        return min(5.0, 0.5 + down / 10) * random.uniform(0.5, 1.0)

    # -- heartbeat ---------------------------------------------------------------------------
    def worker_state(self) -> str:
        running = bool(self.jobs.running)
        if running:
            return "terminating" if self.draining else ("maintenance pending" if self.link.maintenance else "running")
        if self.draining:
            return "offline maintenance" if self.link.maintenance else "offline"
        return "maintenance mode" if self.link.maintenance else "idle"

    def _sysinfo(self) -> dict:
        status, text = (logging.INFO, None) if self.link.versions_match else (logging.WARNING, "Healthy but version mismatch")
        if self.disk.reason is not None:
            status, text = logging.WARNING, f"not taking jobs: {self.disk.reason}"
        info = sysinfo(concurrency=self.link.concurrency, free_concurrency=self.jobs.free_slots,
                       started=self.started_at, edge_version=self.settings.edge_provider_version,
                       status=status, status_text=text)
        info["gpu_slots"] = f"{self.gpus.free}/{self.gpus.total} free"
        note = self.budgets.note()
        if note:
            info["budget"] = note
        return info

    def _apply_local_maintenance(self) -> None:
        """``outpost maintenance on|off`` on this host: enter or leave maintenance, tell the server now."""
        if self.heartbeat.apply_local_maintenance(self.state_folder):
            self._heartbeat_due = True


    async def _go_offline(self, flush_s: float) -> None:
        state = "offline maintenance" if self.link.maintenance else "offline"
        # Through the outbox, behind the jobs' final states, so those reach the server first.
        self.jobs.reports.put_worker(state, self.link.maintenance_comments)
        if await self.jobs.reports.flush(flush_s):
            self._signed_off = True  # status.json says "offline" only now (see StatusWriter.write_final)
            log.info("reported offline to the control plane")
        else:
            log.warning("could not deliver %d report(s) before exiting; they stay in the outbox and are sent at "
                        "the next start (the server will mark this worker lost meanwhile)", self.jobs.reports.depth)

    # -- what observers read ------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)`` for ``/readyz``."""
        ready, reason = self.link.readiness(draining=self.draining)
        if ready and self.disk.reason is not None:
            return False, f"not taking jobs: {self.disk.reason}"
        return ready, reason

    def snapshot(self) -> WorkerSnapshot:
        """The worker's state now, for ``/metrics``."""
        running = list(self.jobs.running.values())
        return WorkerSnapshot(
            state=self.worker_state(), reachable=self.link.reachable, concurrency=self.link.concurrency,
            free_slots=self.jobs.free_slots, running_queues=tuple(r.job.queue for r in running),
            live=tuple(live_tasks(running)), outbox_depth=self.jobs.reports.depth,
            requests_total=self.counter.total, request_rates=self.counter.rates(),
            gpus_total=self.gpus.total, gpus_free=self.gpus.free, gpu_devices=tuple(self.gpus.devices),
            ray=self.ray.describe() if self.ray is not None else None,
            local_triggers=self.triggers.describe() if self.triggers is not None else None,
            reports=self.jobs.reports.describe())

    # -- status ------------------------------------------------------------------------------
    def _status_fields(self, state: str | None) -> dict[str, Any]:
        """What ``status.json`` holds now (``state`` None: the worker's own state)."""
        return {
            "pid": os.getpid(), "name": self.settings.name, "api_url": self.settings.api_url,
            "state": state or self.worker_state(), "updated": time.time(),
            "started": self.started_at.isoformat(), "registered": self.link.registered,
            "disconnected_since": (time.time() - (time.monotonic() - self.link.disconnected_since))
            if self.link.disconnected_since is not None else None,
            "last_heartbeat": self.link.last_heartbeat, "maintenance": self.link.maintenance,
            "maintenance_comments": self.link.maintenance_comments,
            "concurrency": self.link.concurrency, "free_slots": self.jobs.free_slots,
            "queues": self.link.queues, "requests_per_s": self.counter.rates(), "jobs": self.jobs.describe(),
            "finished": self.jobs.finished, "outbox": self.jobs.reports.describe(),
            "local_triggers": self.triggers.describe() if self.triggers is not None else None,
            "gpus": {"total": self.gpus.total, "free": self.gpus.free},
            "paused_queues": {q: p.describe() for q, p in self.budgets.paused.items()},
            "metrics_url": self.health.url if self.health is not None else None,
            "ray": self.ray.describe() if self.ray is not None else None,
            "memory_merge": self.merge_status.read() if self.settings.memory_merge else None,
            "signed_off": self._signed_off, "degraded": self.disk.reason, "loop_errors": self.steps.describe(),
        }

    def _task_pids(self) -> list[int]:
        """The running jobs' task processes (supervisors), for the memory-merge figure."""
        return [run.proc.pid for run in self.jobs.running.values() if run.proc is not None and run.proc.returncode is None]
