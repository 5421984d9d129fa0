"""Prometheus metrics of one worker, in its own registry (never the global one).

Event metrics (jobs by queue and final state, task durations, pickup latency) are updated by the
job runner as things happen; everything else (running jobs, slots, request rates, pending reports,
GPU use, costs, budgets, runner throughput) is read when ``/metrics`` is scraped: from a
:class:`WorkerSnapshot` the worker hands over, the cost ledger and budget guard, and the runners'
report files. Nothing here sees the ``Worker`` itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from airflow_outpost.worker.hosted.costs import BudgetGuard, CostLedger, LiveTask

log = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, float("inf"))
_PICKUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))
MAX_RUNNER_SERIES = 500


@dataclass(frozen=True)
class WorkerSnapshot:
    """The worker's state at one moment, as ``/metrics`` shows it (``Worker.snapshot()``)."""

    state: str
    reachable: bool
    concurrency: int
    free_slots: int
    running_queues: tuple[str, ...]  # the queue of each running job
    live: tuple[LiveTask, ...]  # running jobs, for the budget gauges
    outbox_depth: int
    requests_total: int
    request_rates: Mapping[str, float]
    gpus_total: int
    gpus_free: int
    gpu_devices: tuple[str, ...]
    ray: Mapping[str, Any] | None  # RayHost.describe(), None without a worker Ray
    local_triggers: Mapping[str, Any] | None = None  # LocalTriggers.describe(), None with triggers = central
    reports: Mapping[str, Any] | None = None  # ReportSender.describe(): dead letters, failures, why delivery waits


class WorkerMetrics:
    """The worker's metrics; ``render()`` returns the Prometheus text exposition.

    ``snapshot()`` is called once per scrape. ``costs``/``budgets`` add the cost and budget
    families; ``runner_dir`` is where task processes drop their runner reports.
    """

    def __init__(self, snapshot: Callable[[], WorkerSnapshot], *, costs: CostLedger | None = None,
                 budgets: BudgetGuard | None = None, runner_dir: Path | None = None) -> None:
        self.snapshot = snapshot
        self.costs = costs
        self.budgets = budgets
        self.registry = CollectorRegistry(auto_describe=False)
        self.jobs = Counter("outpost_jobs", "Jobs by queue and state: fetched, running, rejected, adopted, and each final state",
                            ["queue", "state"], registry=self.registry)
        self.workloads = Counter("outpost_workloads", "Finished workloads by kind (task, callback) and final state",
                                 ["kind", "state"], registry=self.registry)
        self.duration = Histogram("outpost_task_duration_seconds", "Task run time, fetch to final state",
                                  ["queue"], buckets=_DURATION_BUCKETS, registry=self.registry)
        self.pickup = Histogram("outpost_pickup_latency_seconds", "Time from job fetch to the task running",
                                ["queue"], buckets=_PICKUP_BUCKETS, registry=self.registry)
        self.loop_errors = Counter("outpost_worker_loop_errors", "Errors in the worker's main-loop steps, by step "
                                   "(each is retried with backoff)", ["step"], registry=self.registry)
        self.runner = RunnerMetrics(runner_dir) if runner_dir is not None else None
        self.registry.register(_StateCollector(self))

    # -- events from the job runner ---------------------------------------------------------
    def job_event(self, queue: str, state: str) -> None:
        self.jobs.labels(queue=queue, state=state).inc()

    def job_started(self, queue: str, pickup_s: float) -> None:
        self.job_event(queue, "running")
        self.pickup.labels(queue=queue).observe(pickup_s)

    def job_finished(self, queue: str, state: str, duration_s: float, kind: str = "task") -> None:
        self.job_event(queue, state)
        self.workloads.labels(kind=kind, state=state).inc()
        self.duration.labels(queue=queue).observe(duration_s)

    def loop_error(self, step: str) -> None:
        self.loop_errors.labels(step=step).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Reads the worker's current state at scrape time."""

    def __init__(self, m: WorkerMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Any]:
        w = self.m.snapshot()
        running = GaugeMetricFamily("outpost_jobs_running", "Jobs running now", labels=["queue"])
        per_queue: dict[str, int] = {}
        for q in w.running_queues:
            per_queue[q] = per_queue.get(q, 0) + 1
        for q, n in sorted(per_queue.items()):
            running.add_metric([q], n)
        yield running
        slots = GaugeMetricFamily("outpost_slots", "Task slots: CPU concurrency and GPUs", labels=["kind", "state"])
        slots.add_metric(["cpu", "total"], w.concurrency)
        slots.add_metric(["cpu", "free"], w.free_slots)
        slots.add_metric(["gpu", "total"], w.gpus_total)
        slots.add_metric(["gpu", "free"], w.gpus_free)
        yield slots
        if (lt := w.local_triggers) is not None:
            yield GaugeMetricFamily("outpost_local_triggers_waiting", "Tasks waiting on a local trigger (no process, no slot)",
                                    value=lt["waiting"])
            yield GaugeMetricFamily("outpost_local_triggers_max", "max_local_triggers: how many may wait at once",
                                    value=lt["max"])
            ended = CounterMetricFamily("outpost_local_triggers_ended", "Waits on local triggers that ended, by how: "
                                        "resume, fail (trigger error, timeout, limit), task_end, gone, stopped",
                                        labels=["end"])
            for kind, n in sorted(lt["ended"].items()):
                ended.add_metric([kind], n)
            yield ended
        yield GaugeMetricFamily("outpost_pending_reports", "State reports in the outbox, not yet acknowledged by the control plane",
                                value=w.outbox_depth)
        if (r := w.reports) is not None:
            yield GaugeMetricFamily("outpost_dead_letter_reports", "Reports the control plane refused for good (404/409/422 "
                                    "after several tries), kept in the outbox's dead-letter table", value=r["dead_letters"])
            failed = CounterMetricFamily("outpost_report_delivery_failures", "Report deliveries that failed, by reason: "
                                         "unreachable, auth (401/403), credentials (unreadable), server (5xx), rejected, error",
                                         labels=["reason"])
            for reason, n in sorted(r["failures"].items()):
                failed.add_metric([reason], n)
            yield failed
            blocked = GaugeMetricFamily("outpost_report_delivery_blocked", "1 while every report waits, by why",
                                        labels=["reason"])
            for reason in ("unreachable", "auth", "credentials"):
                blocked.add_metric([reason], 1 if r.get("blocked_by") == reason else 0)
            yield blocked
        yield CounterMetricFamily("outpost_control_plane_requests", "Requests sent to the control plane",
                                  value=w.requests_total)
        rps = GaugeMetricFamily("outpost_control_plane_requests_per_second",
                                "Requests/s to the control plane: last 60 s, and lifetime while idle / busy",
                                labels=["window"])
        for window in ("recent", "idle", "busy"):
            rps.add_metric([window], float(w.request_rates.get(window, 0.0)))
        yield rps
        up = GaugeMetricFamily("outpost_worker_state", "1 for the worker's current state", labels=["state"])
        up.add_metric([w.state], 1)
        yield up
        yield GaugeMetricFamily("outpost_control_plane_reachable", "1 if the last heartbeat reached the control plane",
                                value=1 if w.reachable else 0)
        if w.ray is not None:
            yield from _ray_families(w.ray)
        yield from _gpu_families(w.gpu_devices)
        yield from self._cost_families(w.live)
        if self.m.runner is not None:
            yield from self.m.runner.families()

    def _cost_families(self, live: tuple[LiveTask, ...]) -> Iterator[Any]:
        ledger, guard = self.m.costs, self.m.budgets
        if ledger is None or guard is None:
            return
        wall = CounterMetricFamily("outpost_task_wall_seconds", "Wall-seconds of finished tasks", labels=["queue", "dag_id"])
        gpu = CounterMetricFamily("outpost_task_gpu_seconds", "GPU-seconds of finished tasks", labels=["queue", "dag_id"])
        for q, d, wall_s, gpu_s in ledger.totals("queue_dag"):
            wall.add_metric([q, d], wall_s)
            gpu.add_metric([q, d], gpu_s)
        yield wall
        yield gpu
        spent = GaugeMetricFamily("outpost_budget_spent_seconds", "Charged seconds spent today (UTC) per budget", labels=["budget"])
        limit = GaugeMetricFamily("outpost_budget_limit_seconds", "Daily budget in charged seconds", labels=["budget"])
        for key, s, lim in ledger.budget_status(list(live)):
            spent.add_metric([key], s)
            limit.add_metric([key], lim)
        yield spent
        yield limit
        paused = GaugeMetricFamily("outpost_queue_paused", "1 while a spent budget stops fetching from the queue", labels=["queue"])
        for q in sorted(guard.paused):
            paused.add_metric([q], 1)
        yield paused


def _ray_families(info: Mapping[str, Any]) -> Iterator[Any]:
    """Whether the Ray the worker gives its tasks answers, and restarts of its own head."""
    up = GaugeMetricFamily("outpost_ray_up", "1 while the Ray given to tasks answers (the worker's own head, or a cluster)",
                           labels=["mode", "address"])
    if info["up"] is not None:
        up.add_metric([str(info["mode"]), str(info["address"])], 1 if info["up"] else 0)
    yield up
    yield CounterMetricFamily("outpost_ray_restarts", "Restarts of the worker's own Ray head", value=info["restarts"])


def _gpu_families(devices: tuple[str, ...]) -> Iterator[Any]:
    """GPU utilisation and memory via NVML, for the devices this worker hands out (indexes only)."""
    indexes = [int(d) for d in devices if d.isdigit()]
    if not indexes:
        return
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML (fake inventory, no driver): nothing to export, detection already logged
        return
    util = GaugeMetricFamily("outpost_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["gpu"])
    used = GaugeMetricFamily("outpost_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
    total = GaugeMetricFamily("outpost_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["gpu"])
    for i in indexes:
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            rates = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        except pynvml.NVMLError as exc:
            log.debug("NVML query of GPU %d failed: %s", i, exc)
            continue
        util.add_metric([str(i)], rates.gpu / 100.0)
        used.add_metric([str(i)], float(mem.used))
        total.add_metric([str(i)], float(mem.total))
    yield util
    yield used
    yield total


class RunnerMetrics:
    """Tails the JSON-lines files that runners write with ``airflow_outpost.runners.metrics_report.report``.

    Counters are summed across tasks, gauges keep the last value. A file whose writer has exited
    is deleted once read to its end. Series are capped at ``MAX_RUNNER_SERIES``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._offsets: dict[str, int] = {}
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.bad_records = 0

    def ingest(self) -> None:
        for path in sorted(self.folder.glob("*.jsonl")):
            offset = self._offsets.get(path.name, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[path.name] = offset + len(complete)
            for line in complete.splitlines():
                self._apply(line)
            if len(complete) == len(data) and not _pid_alive(path.stem):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._offsets.pop(path.name, None)

    def _apply(self, line: bytes) -> None:
        try:
            rec = json.loads(line)
            name, value, kind = str(rec["name"]), float(rec["value"]), rec.get("kind", "counter")
            labels = tuple(sorted((str(k), str(v)) for k, v in (rec.get("labels") or {}).items()))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.bad_records += 1
            return
        if not name.replace("_", "").isalnum() or not name[:1].isalpha():
            self.bad_records += 1
            return
        table = self.gauges if kind == "gauge" else self.counters
        key = (name, labels)
        if key not in table and len(self.counters) + len(self.gauges) >= MAX_RUNNER_SERIES:
            self.bad_records += 1
            return
        table[key] = value if kind == "gauge" else table.get(key, 0.0) + value

    def families(self) -> Iterator[Any]:
        self.ingest()
        for table, family in ((self.counters, CounterMetricFamily), (self.gauges, GaugeMetricFamily)):
            by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
            for (name, labels), value in table.items():
                by_name.setdefault(name, []).append((labels, value))
            for name, series in sorted(by_name.items()):
                label_names = sorted({k for labels, _ in series for k, _v in labels})
                fam = family(f"outpost_runner_{name}", f"Reported by runners: {name}", labels=label_names)
                for labels, value in series:
                    d = dict(labels)
                    fam.add_metric([d.get(k, "") for k in label_names], value)
                yield fam


def _pid_alive(stem: str) -> bool:
    if not stem.isdigit():
        return False
    try:
        os.kill(int(stem), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
