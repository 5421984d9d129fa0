"""The jobs one worker process runs now: :class:`RunningJob` records in a :class:`JobTable`.

The table is what the job runner's parts share (:mod:`.job_runner` starts and ends jobs,
:mod:`.adoption` adds the previous process's, :mod:`.trigger_waits` frees and retakes slots,
:mod:`.drain` stops them); each is given the table, never the runner. It holds no I/O.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from airflow_outpost.worker.edge.jobs import Job, JobKey
    from airflow_outpost.worker.processes.launcher import TaskProcess
    from airflow_outpost.worker.runtime.link import ControlPlaneLink
    from airflow_outpost.worker.triggers.host import Deferral


class JobEvents(Protocol):
    """Where the job runner reports what happens to jobs (``WorkerMetrics`` in the worker)."""

    def job_event(self, queue: str, state: str) -> None: ...
    def job_started(self, queue: str, pickup_s: float) -> None: ...
    def job_finished(self, queue: str, state: str, duration_s: float, kind: str) -> None: ...


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


class JobTable:
    """Running jobs by key, and the slots they hold of ``link.concurrency``.

    ``stopping`` is set once the drain timeout passed: from then on no wait resumes.
    """

    def __init__(self, link: ControlPlaneLink) -> None:
        self.link = link
        self.running: dict[JobKey, RunningJob] = {}
        self.stopping = False

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

    def slots_taken_by_runners(self) -> int:
        """CPU slots held by jobs whose task process runs (not waiting, not waiting for a slot)."""
        return sum(r.job.concurrency_slots for r in self.running.values()
                   if not r.devices and not r.waiting and not r.resume_pending)

    def by_ti(self, ti_id: str) -> RunningJob | None:
        """The running job of task instance ``ti_id``, if this worker runs it."""
        return next((r for r in self.running.values() if r.job.ti_id == ti_id), None)

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"key": str(k), "pid": r.proc.pid if r.proc and not r.waiting else None, "slots": r.job.concurrency_slots,
                 "queue": r.job.queue, "running_s": round(now - r.started, 1), "adopted": r.adopted,
                 "waiting": r.waiting}
                for k, r in self.running.items()]
