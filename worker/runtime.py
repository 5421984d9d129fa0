"""The worker: registers with the control plane, heartbeats, fetches jobs and runs them.

Lifecycle: ``await Worker(settings).run()`` returns the exit code once the worker has drained
and reported itself offline. ``shutdown()`` (from a signal handler or a test) stops fetching
and drains: running tasks may finish for ``drain_timeout_s``, then get SIGTERM, then SIGKILL
after ``kill_grace_s``; every task's final state is reported. A second ``shutdown()`` (or
``shutdown(force=True)``) skips the wait. ``shutdown()`` is safe before ``run()`` and twice.

Polling is adaptive: after a fetch returned work, or when a slot frees, the worker fetches again
at once; while nothing arrives it backs off with jitter from ``poll_min_interval_s`` to
``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from datetime import datetime, timezone

from worker.config import Settings, without_credentials
from worker.edge_client import EdgeClient
from worker.errors import (
    AuthError,
    ConnectError,
    DuplicateWorkerError,
    NotFoundError,
    OutpostError,
    ServerError,
    VersionMismatchError,
)
from worker.costs import BudgetGuard, CostLedger, live_tasks
from worker.exporter import WorkerMetrics
from worker.gpu import GpuAllocator, detect_gpus
from worker.health import HealthServer
from worker.gateway import Egress
from worker.jobrunner import JobRunner
from worker.lifecycle import Lifecycle
from worker.metrics import RequestCounter
from worker.model_host import ModelHost, service_available
from worker.ray_host import RayHost, ray_available
from worker.state import StateFolder
from worker.supervisor import TaskLauncher
from worker.sysinfo import airflow_version, sysinfo

log = logging.getLogger(__name__)


class StartupError(OutpostError):
    """The worker cannot join the control plane; the message is the one line the CLI prints."""


class Worker:
    """One outpost worker process. See the module docstring for the lifecycle."""

    def __init__(self, settings: Settings, *, client: EdgeClient | None = None) -> None:
        self.settings = settings
        self.counter = RequestCounter()
        self.client = client or EdgeClient(settings, counter=self.counter)
        self.egress = Egress(settings)  # policy, ledger and the task processes' gateway
        self.egress.on_upstream_back = self._control_plane_seen
        self._heartbeat_due = False
        self.client.recorder = self.egress.record_edge
        self.state_folder = StateFolder(settings.state_folder)
        self.concurrency = settings.concurrency
        self.queues: list[str] | None = list(settings.queues) if settings.queues else None
        self.maintenance = False
        self.maintenance_comments: str | None = None
        self.draining = False
        self.started_at = datetime.now(timezone.utc)
        self.registered = False
        self.disconnected_since: float | None = None
        self.last_heartbeat: float | None = None
        self.versions_match = True
        self._force = asyncio.Event()
        self._wake = asyncio.Event()
        self._status_due = 0.0
        self._previous_status: dict | None = None
        self.gpus = GpuAllocator(detect_gpus(settings.gpus), settings.gpu_queues)
        self.costs: CostLedger | None = None
        self.budgets: BudgetGuard | None = None
        self.lifecycle = Lifecycle(self)
        # A model service the worker owns, unless the runners are absent or one is configured.
        self.models: ModelHost | None = (
            ModelHost(settings.state_folder, idle_s=settings.model_idle_s)
            if settings.model_service and service_available() and not os.environ.get("OUTPOST_MODEL_SOCKET") else None)
        # The Ray tasks use: a head the worker owns (ray = local), an existing cluster, or None
        # (each task starts its own).
        self.ray: RayHost | None = RayHost.from_settings(settings)
        if self.ray is not None and self.ray.local and not ray_available():
            log.error("ray = local needs Ray in this interpreter (the runners extra); tasks start their own Ray")
            self.ray = None
        self.telemetry = WorkerMetrics(self, runner_dir=settings.state_folder / "runner-metrics"
                                       if settings.metrics_port else None)
        self.health: HealthServer | None = None
        self.jobs = JobRunner(self)

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
        """Run until shut down; return the process exit code (0 after a clean drain)."""
        self.state_folder.acquire()
        # Read before the first write: it tells whether the previous run crashed.
        self._previous_status = self.state_folder.read_status()
        try:
            # Before the launcher: task processes get the gateway's URL. On the previous run's port
            # if possible, which task processes that outlived it (crash_policy adopt) still use.
            await self.egress.start(self.state_folder.gateway_port())
            if self.egress.port is not None:
                self.state_folder.save_gateway_port(self.egress.port)
        except BaseException:
            self.state_folder.release()
            raise
        launcher = TaskLauncher(env=self._task_env(), output_dir=self.state_folder.output_dir,
                                prewarm=self.settings.prewarm, crash_policy=self.settings.crash_policy)
        self.jobs.launcher = launcher
        self.costs = CostLedger(self.state_folder.root / "costs.sqlite", self.settings.budgets)
        self.budgets = BudgetGuard(self.costs)
        if self.settings.metrics_port:
            self.health = HealthServer(self, self.settings.metrics_host, self.settings.metrics_port)
        try:
            if self.health is not None:
                await self.health.start()
            await launcher.start()
            if self.models is not None:
                await self.models.start(self._task_env())
            if self.ray is not None:
                await self.ray.start(without_credentials(self._task_env()))
            await self._startup()
            # Both come up while the zygote imports Airflow. Tasks started before a service is
            # ready would do without it (load their model, start their own Ray).
            await asyncio.gather(*([self.models.wait_ready()] if self.models is not None else []),
                                 *([self.ray.wait_ready()] if self.ray is not None else []))
            self.lifecycle.start_warming()
            await self.jobs.recover_leftovers()
            await self._main_loop()
            await self.jobs.drain(self.lifecycle.drain_timeout_s(), self.settings.kill_grace_s, self._force)
            await self._go_offline()
            return 0
        finally:
            await self.jobs.aclose()  # undelivered reports stay in the outbox for the next start
            await self.lifecycle.aclose()
            if self.health is not None:
                await self.health.aclose()
            self.costs.close()
            await launcher.aclose()
            if self.models is not None:
                await self.models.aclose()
            if self.ray is not None:
                await self.ray.aclose()
            await self.client.aclose()
            await self.egress.aclose()
            self._write_status(force=True, state="offline")
            self.state_folder.release()

    # -- environment for tasks ---------------------------------------------------------------
    def _task_env(self) -> dict[str, str]:
        s = self.settings
        env = {
            # Example DAG bundles are a control-plane convenience; loading them slows every task start.
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # The Task SDK supervisor notices its task has exited only when its select() times out,
            # after up to min_heartbeat_interval (default 5 s): the slot stays busy that long.
            # 1 s frees slots promptly, at the cost of more frequent task heartbeats.
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            **os.environ,
        }
        env.update({
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.egress.url or s.execution_api,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(s.log_folder.resolve()),
            "OUTPOST_WORKER_NAME": s.name,
        })
        if s.outage_hold_s > 0:
            # The gateway holds a request through an outage; the Task SDK client (5 s timeout,
            # 5 tries by default) must wait for it rather than give up and send it again.
            env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"] = str(int(s.outage_hold_s + s.request_timeout_s + 30))
        if self.telemetry.runner is not None:
            env["OUTPOST_METRICS_DIR"] = str(self.telemetry.runner.folder.resolve())
        if s.dags_folder is not None:
            env["AIRFLOW__CORE__DAGS_FOLDER"] = str(s.dags_folder.resolve())
        if self.models is not None:
            env["OUTPOST_MODEL_SOCKET"] = str(self.models.socket)
        elif not s.model_service:
            # A service a task started would be stopped with the task's leftovers: load in-task.
            env["OUTPOST_MODEL_SERVICE"] = "0"
        if self.ray is not None:
            self.ray.scrub(env)  # its variables are set per task, while the worker's Ray is up (jobrunner)
        self.egress.apply_task_env(env)
        return env

    # -- start-up ----------------------------------------------------------------------------
    async def _startup(self) -> None:
        s = self.settings
        s.log_folder.mkdir(parents=True, exist_ok=True)
        try:
            from worker.edge_client import retry

            server = await retry(self.client.server_version, what="reach control plane",
                                 deadline_s=s.startup_timeout_s, base_s=0.5, cap_s=3.0)
        except ConnectError as exc:
            raise StartupError(f"cannot reach the control plane at {s.api_url} within {s.startup_timeout_s:.0f}s: {exc}") from exc
        except ServerError as exc:
            raise StartupError(f"{s.api_url} does not look like an Airflow 3 API server ({exc})") from exc
        ours = airflow_version()
        if server.split(".")[0] != ours.split(".")[0] or not server.startswith("3."):
            raise StartupError(f"incompatible server version: control plane runs Airflow {server}, "
                               f"this worker runs Airflow {ours} (Task SDK); both must be Airflow 3 of the same release")
        try:
            try:
                reply = await self.client.worker.register(s.name, "starting", self.queues, self._sysinfo(), s.team_name)
            except DuplicateWorkerError:
                if not self._previous_run_crashed():
                    raise
                # Same name, same state folder, and the process that used them is gone: this is
                # our own previous incarnation, still "running" on the server. Sign it off.
                log.warning("previous run of worker %r ended without signing off; marking it offline", s.name)
                await self.client.worker.set_state(s.name, "offline", 0, self.queues, self._sysinfo(), None, s.team_name)
                reply = await self.client.worker.register(s.name, "starting", self.queues, self._sysinfo(), s.team_name)
        except DuplicateWorkerError as exc:
            raise StartupError(f"a worker named {s.name!r} is already active on the control plane; "
                               f"pick another --name or stop that worker ({exc.detail})") from exc
        except VersionMismatchError as exc:
            raise StartupError(f"the control plane refused this worker's versions (Airflow {ours}): {exc.detail}") from exc
        except NotFoundError as exc:
            raise StartupError(f"no Edge worker API at {s.edge_api} (HTTP {exc.status}); is the edge3 provider installed "
                               "and [edge] api_enabled=True on the server?") from exc
        except AuthError as exc:
            raise StartupError(f"the control plane refused this worker's credentials (HTTP {exc.status}): check that "
                               "jwt_secret matches the server's [api_auth] jwt_secret and the clocks agree") from exc
        except ServerError as exc:
            raise StartupError(f"registration failed: {exc}") from exc
        self.registered = True
        self.versions_match = bool(reply.get("versions_match", True)) if isinstance(reply, dict) else True
        log.info("registered as %r with %s (Airflow %s); queues=%s concurrency=%d gpus=%s",
                 s.name, s.api_url, server, ",".join(self.queues or ["<all>"]), self.concurrency,
                 ",".join(self.gpus.devices) or "none")
        if self.gpus.unusable_queues(self.queues):
            log.warning("queues %s match gpu_queues but this host has no GPUs: their jobs will not be fetched",
                        ",".join(self.gpus.unusable_queues(self.queues)))

    def _previous_run_crashed(self) -> bool:
        """True if this state folder's last status is ours (same name) and was not signed off."""
        previous = self._previous_status
        return bool(previous and previous.get("name") == self.settings.name
                    and previous.get("state") != "offline" and previous.get("pid") != os.getpid())

    # -- main loop ---------------------------------------------------------------------------
    async def _main_loop(self) -> None:
        s = self.settings
        delay = s.poll_min_interval_s
        next_hb = 0.0
        next_rate_log = time.monotonic() + 60
        while not self.draining:
            now = time.monotonic()
            if now >= next_hb or self._heartbeat_due:
                self._heartbeat_due = False
                ok = await self._heartbeat()
                next_hb = now + (s.heartbeat_interval_s if ok else min(s.heartbeat_interval_s, self._outage_delay()))
            if now >= next_rate_log:
                log.info("control-plane requests/s: %s", self.counter.rates())
                next_rate_log = now + 60
            self.lifecycle.tick()
            self.budgets.refresh(live_tasks(list(self.jobs.running.values())))
            got = False
            if self._may_fetch():
                got = await self.jobs.fetch_one()
            self._write_status()
            if got:
                delay = s.poll_min_interval_s
                continue  # more work may be queued: ask again at once
            timeout = min(delay, max(0.0, next_hb - time.monotonic()))
            woken = await self._sleep(timeout)
            if woken:
                delay = s.poll_min_interval_s  # a slot freed: downstream work is likely queued soon
            else:
                delay = min(s.poll_interval_s, delay * 1.5) * random.uniform(0.8, 1.0)
                delay = max(delay, s.poll_min_interval_s)

    def _may_fetch(self) -> bool:
        return (not self.draining and not self.maintenance and self.disconnected_since is None
                and (self.jobs.free_slots > 0 or self.gpus.free > 0))

    async def _sleep(self, timeout: float) -> bool:
        """Sleep up to ``timeout``; return True if woken early (slot freed, shutdown)."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def wake(self) -> None:
        self._wake.set()

    def _control_plane_seen(self) -> None:
        """A task request got through while we count the control plane as away: heartbeat now."""
        if self.disconnected_since is not None:
            self._heartbeat_due = True
            self._wake.set()

    def _outage_delay(self) -> float:
        down = time.monotonic() - (self.disconnected_since or time.monotonic())
        # Probe at most every 5 s: one cheap request, and a recovery is noticed within seconds.
        return min(5.0, 0.5 + down / 10) * random.uniform(0.5, 1.0)

    # -- heartbeat ---------------------------------------------------------------------------
    def worker_state(self) -> str:
        running = bool(self.jobs.running)
        if running:
            return "terminating" if self.draining else ("maintenance pending" if self.maintenance else "running")
        if self.draining:
            return "offline maintenance" if self.maintenance else "offline"
        return "maintenance mode" if self.maintenance else "idle"

    def _sysinfo(self) -> dict:
        status, text = (logging.INFO, None) if self.versions_match else (logging.WARNING, "Healthy but version mismatch")
        info = sysinfo(concurrency=self.concurrency, free_concurrency=self.jobs.free_slots,
                       started=self.started_at, edge_version=self.settings.edge_provider_version,
                       status=status, status_text=text)
        info["gpu_slots"] = f"{self.gpus.free}/{self.gpus.total} free"
        note = self.budgets.note() if self.budgets is not None else None
        if note:
            info["budget"] = note
        return info

    async def _heartbeat(self) -> bool:
        """Send one heartbeat and apply what the reply asks. Returns False if the server was unreachable."""
        s = self.settings
        state = self.worker_state()
        try:
            # The budget note rides along as a maintenance comment (kept by the server only in
            # maintenance states) and in sysinfo["budget"] (always shown).
            comments = self.maintenance_comments or (self.budgets.note() if self.budgets is not None else None)
            reply = await self.client.worker.set_state(s.name, state, len(self.jobs.running), self.queues,
                                                       self._sysinfo(), comments, s.team_name)
        except (ConnectError, ServerError) as exc:
            if exc.retryable:
                if self.disconnected_since is None:
                    self.disconnected_since = time.monotonic()
                    log.warning("control plane unreachable (%s); running tasks continue, fetching paused", exc)
                return False
            if isinstance(exc, VersionMismatchError):
                log.error("server refuses this worker's version now: %s; draining", exc.detail)
                self.shutdown()
                return True
            if isinstance(exc, NotFoundError):
                # The server forgot us (e.g. deleted from the UI): register again.
                log.warning("control plane does not know this worker (%s); registering again", exc.detail)
                await self.client.worker.register(s.name, state, self.queues, self._sysinfo(), s.team_name)
                return True
            log.error("heartbeat rejected: %s", exc)
            return True
        if self.disconnected_since is not None:
            log.info("control plane reachable again after %.1fs", time.monotonic() - self.disconnected_since)
            self.disconnected_since = None
            self.jobs.retry_pending_reports()
            self.egress.control_plane_back()  # held task requests retry now, not after their backoff
        self.last_heartbeat = time.time()
        self._apply_reply(reply or {})
        return True

    def _apply_reply(self, reply: dict) -> None:
        self.versions_match = bool(reply.get("versions_match", True))
        server_state = reply.get("state")
        if "queues" in reply and reply["queues"] != self.queues:
            log.info("queues changed by the control plane: %s -> %s", self.queues, reply["queues"])
            self.queues = reply["queues"]
        new_conc = reply.get("concurrency")
        if isinstance(new_conc, int) and new_conc > 0 and new_conc != self.concurrency:
            log.info("concurrency changed by the control plane: %d -> %d", self.concurrency, new_conc)
            self.concurrency = new_conc
        if server_state == "maintenance request" and not self.maintenance:
            log.info("maintenance mode requested: no new jobs until it is lifted (%s)", reply.get("maintenance_comments"))
            self.maintenance = True
        elif server_state in ("idle", "running") and self.maintenance:
            log.info("maintenance mode lifted")
            self.maintenance = False
        self.maintenance_comments = reply.get("maintenance_comments") if self.maintenance else None
        if server_state == "shutdown request" and not self.draining:
            log.info("shutdown requested by the control plane")
            self.shutdown()

    async def _go_offline(self) -> None:
        state = "offline maintenance" if self.maintenance else "offline"
        # Through the outbox, behind the jobs' final states, so those reach the server first.
        self.jobs.report_worker_state(state, self.maintenance_comments)
        if await self.jobs.flush_outbox(30):
            log.info("reported offline to the control plane")
        else:
            log.warning("could not deliver %d report(s) before exiting; they stay in the outbox and are sent at "
                        "the next start (the server will mark this worker lost meanwhile)", self.jobs.outbox_depth)

    # -- status ------------------------------------------------------------------------------
    def _write_status(self, *, force: bool = False, state: str | None = None) -> None:
        now = time.monotonic()
        if not force and now < self._status_due:
            return
        self._status_due = now + 1.0
        self.state_folder.write_status({
            "pid": os.getpid(), "name": self.settings.name, "api_url": self.settings.api_url,
            "state": state or self.worker_state(), "updated": time.time(),
            "started": self.started_at.isoformat(), "registered": self.registered,
            "disconnected_since": (time.time() - (time.monotonic() - self.disconnected_since))
            if self.disconnected_since is not None else None,
            "last_heartbeat": self.last_heartbeat, "maintenance": self.maintenance,
            "maintenance_comments": self.maintenance_comments,
            "concurrency": self.concurrency, "free_slots": self.jobs.free_slots,
            "queues": self.queues, "requests_per_s": self.counter.rates(), "jobs": self.jobs.describe(),
            "gpus": {"total": self.gpus.total, "free": self.gpus.free},
            "paused_queues": {q: p.describe() for q, p in (self.budgets.paused if self.budgets else {}).items()},
            "metrics_url": self.health.url if self.health is not None else None,
            "ray": self.ray.describe() if self.ray is not None else None,
        })
