"""Where ``embed_corpus`` runs its partitions: in this process, or across a Ray cluster.

Both engines run the same steps of ``airflow_outpost.runners.embeddings.partitions`` and so write
the same catalog parts and shards, byte for byte given the same model:

* ``LocalEngine``: one process. Partitions one after the other, the model loaded here.
* ``RayEngine``: scanning and chunking as Ray tasks (one per partition, a streaming generator
  whose yields wait for the driver, so a partition never runs far ahead of the model), the model
  in ``ShardEncoder`` actors spread over the nodes (one GPU each where there are GPUs, else
  ``cpus_per_actor`` CPUs), each committing the shards it computed straight into the store (a
  shared filesystem on a cluster). The driver only routes object references and collects the
  small per-shard records; texts and vectors never pass through it.

A Ray node that dies mid-run: its actors are restarted elsewhere and their calls retried (Ray's
``max_restarts`` / ``max_task_retries``); if Ray gives up, the call raises ``ComputeLostError``
(retryable) and a retry reuses every shard committed so far.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from airflow_outpost.runners.embeddings.partitions import (
    PartitionPlan,
    PartitionResult,
    ShardEncoder,
    ShardJob,
    chunk_partition,
    scan_partition,
)
from airflow_outpost.runners.errors import ComputeLostError

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EmbedConfig:
    """How ``embed_corpus`` streams. ``shard_rows`` vectors per shard (the unit a retry reuses);
    ``read_rows`` documents per read batch. Ray only: ``actors`` model replicas (None: one per GPU,
    else as many as fit ``cpus_per_actor`` next to ``read_cpus`` per partition task),
    ``gpus_per_actor`` (None: 1 where the cluster has GPUs), ``partitions_in_flight`` partition
    tasks ahead of the one being consumed (None: one per actor). ``keep_unpublished_s``: how long
    the shards and parts of a run that never published are kept for its retry to reuse; the next
    publish of the name removes older ones (embeddings.unpublished)."""

    shard_rows: int = 4096
    read_rows: int = 512
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    read_cpus: float = 0.25
    partitions_in_flight: int | None = None
    keep_unpublished_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        for name in ("shard_rows", "read_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"EmbedConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"EmbedConfig.actors={self.actors!r} is invalid: must be >= 1 or None")
        if not 0 <= self.keep_unpublished_s < float("inf"):
            raise ValueError(f"EmbedConfig.keep_unpublished_s={self.keep_unpublished_s!r} is invalid: must be a "
                             "finite number of seconds >= 0")
        if self.cpus_per_actor < 0 or not 0 < self.read_cpus <= 1:
            raise ValueError("EmbedConfig.cpus_per_actor must be >= 0 and read_cpus in (0, 1]")


OnPartition = Callable[[PartitionPlan, PartitionResult, list[dict[str, Any]]], None]


class LocalEngine:
    """Everything in this process; the embedder is built once by ``factory``."""

    name = "local"

    def __init__(self, factory: Callable[[], Any], dtype: str) -> None:
        self.encoder = ShardEncoder(factory, dtype)

    def info(self) -> dict[str, Any]:
        return self.encoder.info()

    def scan(self, paths: list[str], read_rows: int) -> list[dict[str, Any]]:
        return [scan_partition(p, read_rows) for p in paths]

    def run(self, plans: list[PartitionPlan], tokenizer: Any, on_partition: OnPartition) -> None:
        for plan in plans:
            records = []
            for item in chunk_partition(plan, tokenizer):
                if isinstance(item, ShardJob):
                    records.append(self.encoder(item))
                else:
                    on_partition(plan, item, records)


def _partition_task(plan: PartitionPlan, tokenizer: Any) -> Iterator[Any]:
    yield from chunk_partition(plan, tokenizer)


class _ActorShardEncoder(ShardEncoder):
    """``ShardEncoder`` as a Ray actor. An error while building the model (a missing model, a
    backend the node lacks) is kept and raised by every call: the driver then sees that error,
    its type, message and ``retryable``, instead of the ``ActorDiedError`` Ray raises after
    restarting a failing constructor ``max_restarts`` times, which would read as lost compute."""

    def __init__(self, factory: Callable[[], Any], dtype: str) -> None:
        self._init_error: Exception | None = None
        try:
            super().__init__(factory, dtype)
        except Exception as exc:
            self._init_error = exc

    def _check(self) -> None:
        if self._init_error is not None:
            raise self._init_error

    def info(self) -> dict[str, Any]:
        self._check()
        return super().info()

    def __call__(self, job: ShardJob) -> dict[str, Any]:
        self._check()
        return super().__call__(job)


_LOST = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
         "ActorDiedError", "ActorUnavailableError", "ObjectReconstructionFailedError")


def _is_lost(exc: BaseException) -> bool:
    return any(cls.__name__ in _LOST for cls in type(exc).__mro__)


class RayEngine:
    """Partition tasks and model actors on the Ray cluster of ``ray_config``; see the module doc."""

    name = "ray"

    def __init__(self, factory: Callable[[], Any], dtype: str, ray_config: Any, config: EmbedConfig,
                 stack: contextlib.ExitStack) -> None:
        import ray

        from airflow_outpost.runners.batch.ray_session import ray_session

        session = stack.enter_context(ray_session(ray_config))
        self.address = session["address"]
        resources = session["resources"]
        gpus = config.gpus_per_actor if config.gpus_per_actor is not None else \
            (1.0 if resources.get("GPU", 0) > 0 else 0.0)
        n = config.actors
        if n is None:
            n = int(resources.get("GPU", 0) // gpus) if gpus else \
                int((resources.get("CPU", 1) - config.read_cpus) // max(config.cpus_per_actor, 1e-9))
            n = max(1, n)
        self.config, self.gpus = config, gpus
        actor_cls: Any = ray.remote(_ActorShardEncoder)
        self.actors: list[Any] = [
            actor_cls.options(num_cpus=config.cpus_per_actor, num_gpus=gpus, scheduling_strategy="SPREAD",
                              max_restarts=3, max_task_retries=3).remote(factory, dtype)
            for _ in range(n)
        ]
        stack.callback(self._kill_actors)
        # Yields wait for the driver past 4 unconsumed ones: a partition never runs far ahead of the model.
        self.task = ray.remote(_partition_task).options(num_cpus=config.read_cpus, max_retries=3,
                                                       scheduling_strategy="SPREAD",
                                                       _generator_backpressure_num_objects=4)
        self.scan_task = ray.remote(scan_partition).options(num_cpus=config.read_cpus, scheduling_strategy="SPREAD")
        log.info("embed_corpus on Ray: %d model actor(s), %g GPU each", n, gpus)

    def _kill_actors(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)

    def _get(self, refs: Any) -> Any:
        import ray

        try:
            return ray.get(refs)
        except Exception as exc:
            if _is_lost(exc):
                raise ComputeLostError(f"Ray lost a worker or node mid-run ({type(exc).__name__}); every shard "
                                       "committed so far is kept and a retry reuses it") from exc
            raise

    def info(self) -> dict[str, Any]:
        return dict(self._get(self.actors[0].info.remote()))

    def scan(self, paths: list[str], read_rows: int) -> list[dict[str, Any]]:
        return list(self._get([self.scan_task.remote(p, read_rows) for p in paths]))

    def run(self, plans: list[PartitionPlan], tokenizer: Any, on_partition: OnPartition) -> None:
        import ray

        tok = ray.put(tokenizer)
        ahead = self.config.partitions_in_flight or len(self.actors)
        gens: dict[int, Any] = {}
        inflight: list[Any] = []
        # Partitions whose shards were sent, oldest first: (plan, result ref, shard refs). The next
        # partition's shards go out while these finish; waiting for each partition before sending the
        # next left all but one actor idle whenever a partition had fewer shards than there are actors.
        sent: deque[tuple[PartitionPlan, Any, list[Any]]] = deque()
        # Each shard goes to the actor with the fewest calls in flight (ties: the one served least
        # recently). Plain round robin sent every partition's full shards to one actor and its short
        # last shards to the other whenever a partition had as many shards as there are actors.
        owner: dict[Any, int] = {}
        load = [0] * len(self.actors)
        served = [0] * len(self.actors)
        calls = 0

        def settle(ready: list[Any]) -> None:
            for done in ready:
                load[owner.pop(done)] -= 1

        def launch(i: int) -> None:
            if i < len(plans) and i not in gens:
                gens[i] = self.task.remote(plans[i], tok)

        def finish_oldest(wait: bool) -> bool:
            plan, last, shard_refs = sent[0]
            if not wait:
                refs = [last, *shard_refs]
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                if len(ready) < len(refs):
                    return False
            sent.popleft()
            on_partition(plan, self._get(last), list(self._get(shard_refs)))
            return True

        for i, plan in enumerate(plans):
            for j in range(i, i + ahead + 1):
                launch(j)
            shard_refs: list[Any] = []
            last = None
            try:
                for ref in gens.pop(i):
                    if last is not None:
                        if inflight:
                            ready, inflight = ray.wait(inflight, num_returns=len(inflight), timeout=0,
                                                       fetch_local=False)
                            settle(ready)
                        while len(inflight) >= 2 * len(self.actors):
                            ready, inflight = ray.wait(inflight, num_returns=1, fetch_local=False)
                            settle(ready)
                        a = min(range(len(self.actors)), key=lambda k: (load[k], served[k]))
                        out = self.actors[a].__call__.remote(last)
                        calls += 1
                        owner[out], served[a] = a, calls
                        load[a] += 1
                        shard_refs.append(out)
                        inflight.append(out)
                    last = ref
            except Exception as exc:
                if _is_lost(exc):
                    raise ComputeLostError(f"Ray lost the task of partition {plan.part_id or plan.source!r} "
                                           f"({type(exc).__name__}); a retry reuses committed shards") from exc
                raise
            assert last is not None  # the generator always yields its PartitionResult
            sent.append((plan, last, shard_refs))
            # Record finished partitions in order; hold at most `ahead` unrecorded ones.
            while sent and (finish_oldest(wait=len(sent) > ahead)):
                pass
        while sent:
            finish_oldest(wait=True)
