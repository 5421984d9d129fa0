"""Adding shard groups apart and merging them: on-disk builds, and ``engine="ray"``.

As in FAISS's ``demos/demo_ondisk_ivf.py``: the index is trained once, its empty trained bytes
(``faiss.serialize_index``) are shipped to every group, each group adds its shards into its own
copy and writes it as a part file, and the parts are merged, into in-memory inverted lists or
into one ``OnDiskInvertedLists`` file. A group also computes the exact top-k of the evaluation
queries over its rows, so the recall gate's ground truth comes from the same pass over the data
(the driver merges the groups' top-k lists).

Part files live in a staging directory ``<index_dir>/.tmp-build.<host>~<pid>.*`` owned by the
driver (swept by the next writer once the driver is gone); each is written to a temporary name
and renamed, so a group that Ray retries after a lost node replaces it whole. Nothing becomes a
version until every group has finished and the driver publishes under the writer lock.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from airflow_outpost.runners.errors import RayConnectError, SettingError
from airflow_outpost.runners.index.exact_lists import add_batches, merge_exact

if TYPE_CHECKING:
    import faiss

    from airflow_outpost.runners.batch.ray_session import RayConfig
    from airflow_outpost.runners.index.shards import Shard

__all__ = ["GroupJob", "add_group", "group_shards", "merge_parts", "run_groups_local", "run_groups_on_ray"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupJob:
    """One group of shards to add: their positions in the build's shard list and excluded ids."""

    number: int
    shards: list[Shard]
    shard_numbers: list[int]
    excludes: list[np.ndarray]
    out: str  # the part file to write

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def group_shards(shards: list[Shard], excludes: list[np.ndarray], groups: int, staging: Path) -> list[GroupJob]:
    """Cut the shard list into at most ``groups`` contiguous groups of about equal rows."""
    groups = max(1, min(groups, len(shards)))
    target = sum(s.rows for s in shards) / groups
    jobs: list[GroupJob] = []
    current: list[int] = []
    filled = 0
    for i, shard in enumerate(shards):
        current.append(i)
        filled += shard.rows
        left_groups = groups - len(jobs) - 1
        if (filled >= target * (len(jobs) + 1) and left_groups > 0) or i == len(shards) - 1:
            n = len(jobs)
            jobs.append(GroupJob(n, [shards[j] for j in current], list(current), [excludes[j] for j in current],
                                 str(staging / f"part-{n:05d}.faiss")))
            current = []
    return jobs


def add_group(trained: np.ndarray, job: GroupJob, queries: np.ndarray, truth_k: int, metric: str,
              batch_rows: int) -> dict[str, Any]:
    """Add ``job``'s rows to a copy of the ``trained`` empty index and write it to ``job.out``.

    Runs in the driver (local on-disk builds) or in a Ray task. Returns the rows added, the
    part path, this group's exact top-``truth_k`` of ``queries`` and where it ran (Ray node id,
    host). Idempotent: a rerun rewrites the same part whole.
    """
    import faiss

    from airflow_outpost.runners.index.factory import faiss_metric
    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.shards import located_batches

    started = time.perf_counter()
    index = faiss.deserialize_index(np.asarray(trained, dtype=np.uint8))
    truth = ExactTopK(queries, truth_k, faiss_metric(metric))
    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, _, ids, vectors, _ in located_batches(job.shards, batch_rows, job.excludes,
                                                     shard_numbers=job.shard_numbers):
            yield ids, vectors

    # IVF lists sized once, as in a local build (exact_lists): the task holds its part, not its growth.
    rows = add_batches(index, batches, on_first_pass=lambda batch: truth.add(batch[0], batch[1]))
    tmp = f"{job.out}.tmp-{uuid.uuid4().hex}"
    faiss.write_index(index, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, job.out)
    return {"group": job.number, "rows": rows, "path": job.out, "truth_ids": truth.ids, "truth_scores": truth.scores,
            "node_id": _ray_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "shards": [s.vectors.name for s in job.shards], "seconds": round(time.perf_counter() - started, 3)}


def _ray_node_id() -> str | None:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency of the runners
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def run_groups_local(trained: np.ndarray, jobs: list[GroupJob], queries: np.ndarray, truth_k: int, metric: str,
                     batch_rows: int) -> Iterator[dict[str, Any]]:
    """``add_group`` for each job in this process, one at a time (memory: one group's index)."""
    for job in jobs:
        yield add_group(trained, job, queries, truth_k, metric, batch_rows)


def cluster_cpus(resources: dict[str, Any]) -> int:
    return max(1, int(resources.get("CPU", 1)))


def run_groups_on_ray(
    trained: np.ndarray, make_jobs: Any, queries: np.ndarray, truth_k: int, metric: str, batch_rows: int,
    ray_config: RayConfig | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Run ``add_group`` as Ray tasks over the cluster's nodes (round-robin); return results and the address.

    ``make_jobs(cpus)`` cuts the groups once the cluster's size is known. A task whose worker or
    node dies is retried by Ray (``max_retries=3``) on a live node; if it still cannot finish the
    build fails with ``RayConnectError`` (retryable) and nothing is published. An exception
    raised inside a task (bad input) is raised here as itself.
    """
    import ray

    from airflow_outpost.runners.batch.ray_session import ray_session

    with ray_session(ray_config) as session:
        jobs: list[GroupJob] = make_jobs(cluster_cpus(session["resources"]))
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=1, max_retries=3)(add_group)
        trained_ref, queries_ref = ray.put(trained), ray.put(queries)
        # Round-robin over the nodes with CPUs ("SPREAD" is only a hint and often packs one node);
        # soft, so a retry after a lost node goes to any live node.
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True)
                             if nodes else "SPREAD").remote(trained_ref, job, queries_ref, truth_k, metric, batch_rows)
                for i, job in enumerate(jobs)]
        log.info("index build: %d shard groups as Ray tasks on %s", len(jobs), session["address"] or "a local Ray")
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError:
            raise  # the task's own exception (it is also an instance of the original class)
        except ray.exceptions.RayError as exc:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise RayConnectError(
                f"index build: a Ray task adding a shard group was lost and could not be retried ({type(exc).__name__}: "
                f"{exc}); nothing was published, running the build again redoes it") from exc
        return results, session["address"]


def merge_parts(index: faiss.Index, kind: str, parts: list[str], ivfdata: Path | None) -> faiss.Index:
    """Merge the part files into the trained empty ``index``; into ``ivfdata`` on disk when given."""
    import faiss

    if kind == "hnsw":
        raise SettingError("HNSW indexes cannot be merged from parts: use a flat or IVF kind with engine='ray'")
    if kind == "flat":
        # merge_from wants the exact same classes, and a Flat read back from a file is an
        # IndexFlatIP/IndexFlatL2 where the factory made an IndexFlat: merge into a read-back copy.
        target = faiss.deserialize_index(faiss.serialize_index(index))
        for path in parts:
            target.merge_from(faiss.read_index(path), 0)
        return target
    index_ivf = faiss.extract_index_ivf(index)
    if ivfdata is None:
        # Each list sized once to its total (not grown part after part): the merge holds the index.
        merge_exact(index, parts)
        return index
    # demo_ondisk_ivf.py / faiss.contrib.ondisk.merge_ondisk: parts memory-mapped, lists written to disk.
    loaded = [faiss.read_index(path, faiss.IO_FLAG_MMAP) for path in parts]
    lists = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # SWIG names the stubs miss
    for part in loaded:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    invlists = faiss.OnDiskInvertedLists(index_ivf.nlist, index_ivf.code_size, str(ivfdata))
    ntotal = invlists.merge_from_multiple(lists.data(), lists.size(), False)
    index.ntotal = index_ivf.ntotal = ntotal
    index_ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now
    del loaded
    return index
