"""GPU-aware slots: which devices this worker hands out, and to which task.

Tasks on GPU queues (``gpu_queues``, glob patterns, default ``gpu*``) take as many GPUs as their
``pool_slots`` (the Edge job's ``concurrency_slots``). The worker fetches from GPU queues with
``free_concurrency`` = free GPUs and from CPU queues with its ordinary free slots, so a GPU job is
claimed only when enough devices are free; each task process gets ``CUDA_VISIBLE_DEVICES`` for
its own devices and no two running tasks share one. GPU jobs do not use CPU slots.

The inventory is, in order: the ``gpus`` setting (a fake inventory for tests, or a subset),
the worker's own ``CUDA_VISIBLE_DEVICES``, NVML, then torch.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


def detect_gpus(override: Sequence[str] | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The device ids this worker may hand out (strings as ``CUDA_VISIBLE_DEVICES`` takes them)."""
    if override is not None:
        return tuple(override)
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # The host (or a container runtime) already narrowed what we may use.
        return tuple(d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1")
    from airflow_outpost.worker.edge.sysinfo import gpus

    found = tuple(str(g["index"]) for g in gpus())
    if found:
        return found
    if os.path.exists("/proc/driver/nvidia") and importlib.util.find_spec("torch") is not None:
        import torch

        return tuple(str(i) for i in range(torch.cuda.device_count()))
    return ()


@dataclass(frozen=True)
class FetchGroup:
    """One fetch request: these queues (``None`` = all), with this much free capacity."""

    queues: tuple[str, ...] | None
    free: int
    gpu: bool


class GpuAllocator:
    """Hands out whole devices to owners (job keys). Not thread-safe: one event loop."""

    def __init__(self, devices: Sequence[str], patterns: Sequence[str]) -> None:
        self.devices = tuple(devices)
        self.patterns = tuple(patterns)
        self._owner: dict[str, Hashable] = {}

    @property
    def total(self) -> int:
        return len(self.devices)

    @property
    def free(self) -> int:
        return len(self.devices) - len(self._owner)

    def is_gpu_queue(self, queue: str | None) -> bool:
        return queue is not None and any(fnmatch.fnmatchcase(queue, p) for p in self.patterns)

    def held_by(self, owner: Hashable) -> tuple[str, ...]:
        return tuple(d for d in self.devices if self._owner.get(d) == owner)

    def allocate(self, owner: Hashable, count: int) -> tuple[str, ...] | None:
        """Give ``count`` free devices to ``owner`` (lowest ids first); ``None`` if not enough are free.

        Idempotent per owner: an owner that already holds devices gets the same ones back.
        """
        held = self.held_by(owner)
        if held:
            return held
        if count < 1:
            raise ValueError(f"a GPU task needs at least one device, asked for {count}")
        free = [d for d in self.devices if d not in self._owner]
        if len(free) < count:
            return None
        chosen = tuple(free[:count])
        for d in chosen:
            self._owner[d] = owner
        return chosen

    def assign(self, owner: Hashable, queue: str, slots: int) -> tuple[str, ...]:
        """Devices for a claimed job: ``()`` for a CPU-queue job (or on a host without GPUs).

        A GPU-queue job fetched with ``free_concurrency`` = free GPUs always fits. One that does
        not (claimed through "all queues") runs without a GPU rather than share a device.
        """
        if not self.devices or not self.is_gpu_queue(queue):
            return ()
        devices = self.allocate(owner, slots)
        if devices is None:
            log.warning("job %s on GPU queue %s needs %d GPU(s) but %d of %d are free; it runs without a GPU "
                        "(serve GPU queues by name in --queues to have it wait for devices)",
                        owner, queue, slots, self.free, self.total)
            return ()
        return devices

    def claim(self, owner: Hashable, devices: Sequence[str]) -> tuple[str, ...]:
        """Give ``owner`` these exact devices (an adopted task keeps the GPUs it runs on).

        Devices this worker does not have, or that another owner holds, are left out; returns
        the ones ``owner`` now holds.
        """
        for d in devices:
            if d in self.devices and self._owner.get(d, owner) == owner:
                self._owner[d] = owner
        return self.held_by(owner)

    def release(self, owner: Hashable) -> None:
        """Return ``owner``'s devices; safe if it holds none."""
        for d in [d for d, o in self._owner.items() if o == owner]:
            del self._owner[d]

    def fetch_plan(self, queues: Sequence[str] | None, cpu_free: int, paused: Collection[str] = frozenset(),
                   turn: int = 0) -> list[FetchGroup]:
        """The fetch requests to try, in order, for one poll.

        CPU and GPU groups alternate which goes first with ``turn``, so a busy GPU
        queue cannot starve CPU queues (or the reverse). Paused queues (spent budget) are left
        out. With ``queues=None`` (all queues) the queues cannot be split: one request with the
        CPU slots, and a GPU-queue job claimed that way gets devices only if enough are free.
        """
        if queues is None:
            return [FetchGroup(None, cpu_free, False)] if cpu_free > 0 else []
        live = [q for q in queues if q not in paused]
        gpu_qs = tuple(q for q in live if self.is_gpu_queue(q))
        cpu_qs = tuple(q for q in live if not self.is_gpu_queue(q))
        groups = []
        if cpu_qs and cpu_free > 0:
            groups.append(FetchGroup(cpu_qs, cpu_free, False))
        if gpu_qs and self.free > 0:
            groups.append(FetchGroup(gpu_qs, self.free, True))
        if len(groups) == 2 and turn % 2:
            groups.reverse()
        return groups

    def unusable_queues(self, queues: Sequence[str] | None) -> list[str]:
        """GPU queues this worker serves but can never run (no devices): worth a warning at start."""
        if self.devices or not queues:
            return []
        return [q for q in queues if self.is_gpu_queue(q)]
