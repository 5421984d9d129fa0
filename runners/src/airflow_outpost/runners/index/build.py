"""FAISS index rebuilds from embedding shards, with a recall gate, promotion, rollback and updates.

``build_index`` reads the shards of an embeddings directory in bounded batches, builds a Flat,
IVF-Flat, IVF-PQ (optionally OPQ), IVF-SQ8 or HNSW index (``.config``), measures recall@k against
exact search on held-out queries (with and without the rerank of the compressed kinds,
``.rerank``), writes a new versioned directory atomically and promotes it to ``current`` only
if recall passes the gate. With ``IndexConfig(on_disk=True)`` the inverted lists are built in
parts and merged into an on-disk file; with ``engine="ray"`` the parts are added by Ray tasks
on the cluster's nodes (``.parallel``); memory is bounded by the index, not the data.
``update_index`` applies new shards and deleted ids to the current version without retraining
(Flat and IVF; HNSW cannot remove and falls back to a rebuild). Both take the source first, then
the target: ``(embeddings_dir, index_dir)``. Every call returns a small summary dict for XCom
(``airflow_outpost.runners.results.IndexSummary``: counts, version, recall, paths), never vectors.

Layout and promotion: see ``airflow_outpost.runners.index.versions``. GPU FAISS is used for training and
adding when a GPU build of FAISS and a GPU are present (``faiss.get_num_gpus() > 0``,
``device="auto"``); HNSW, updates and Ray tasks' adds run on CPU (Ray builds train on the GPU).
FAISS and numpy are imported when a build runs, not with this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Real (not TYPE_CHECKING): DAG authors' type tools resolve build_index's hints at run time.
from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.errors import DimensionMismatchError, InputError, SettingError
from airflow_outpost.runners.index.config import IVF_KINDS, IndexConfig, choose_kind
from airflow_outpost.runners.index.factory import faiss_metric as _faiss_metric
from airflow_outpost.runners.index.factory import new_index, set_search_params, to_device, train, use_gpu
from airflow_outpost.runners.index.versions import (
    CURRENT,
    INDEX_FILE,
    IVFDATA_FILE,
    MANIFEST,
    VERSIONS,
    IndexStateError,
    current_version,
    is_index_dir,
    list_versions,
    load_index,
    next_version,
    promote,
    read_version_manifest,
    rollback,
    sweep_temporaries,
    version_dir,
)
from airflow_outpost.runners.results import IndexSummary
from airflow_outpost.runners.store.atomic import atomic_directory, temp_prefix
from airflow_outpost.runners.store.region_store import code_version, hash_file
from airflow_outpost.runners.store.writer_lock import LockSettings, WriterLease, writer_lock

if TYPE_CHECKING:
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.id_strings import IdStrings
    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.shards import Shard

__all__ = [
    "IndexConfig",
    "IndexStateError",
    "IndexSummary",
    "build_index",
    "current_version",
    "list_versions",
    "promote",
    "rollback",
    "update_index",
]

log = logging.getLogger(__name__)
# Exact truth is kept this many times deeper than k so deletions rarely force a full rescan.
_TRUTH_DEPTH = 4
_ENGINES = ("local", "ray")

ProgressFn = Callable[[int, int], None]
Locations = tuple["np.ndarray", "np.ndarray", "np.ndarray"]
# Kept for the modules that imported them from here.
_set_search_params = set_search_params


def _shard_record(shard: Shard, emb_dir: Path) -> dict[str, Any]:
    st = shard.vectors.stat()
    return {
        "vectors": shard.vectors.relative_to(emb_dir).as_posix(),
        "ids": shard.ids.relative_to(emb_dir).as_posix(),
        "rows": shard.rows,
        "sha256": hash_file(shard.vectors),
        "ids_sha256": hash_file(shard.ids),
        # size + mtime detect a rewritten shard on update without rehashing every shard.
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _embeddings_lineage(emb_dir: Path) -> dict[str, Any]:
    manifest = emb_dir / MANIFEST
    out: dict[str, Any] = {"path": str(emb_dir.resolve())}
    if manifest.is_file():
        out["manifest_sha256"] = hash_file(manifest)
        try:
            out["model"] = json.loads(manifest.read_text(encoding="utf-8")).get("model")
        except ValueError:
            out["model"] = None
    return out


def _queries_array(queries: Any, dim: int) -> np.ndarray:
    import numpy as np

    arr = np.load(queries, allow_pickle=False) if isinstance(queries, (str, os.PathLike)) else np.asarray(queries)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DimensionMismatchError(f"evaluation queries have shape {arr.shape}; the vectors have dimension {dim}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _write_version(
    index_dir: Path, index: faiss.Index, truth: ExactTopK, deleted: np.ndarray,
    id_strings: IdStrings, manifest: dict[str, Any], lease: WriterLease,
    ivfdata: Path | None, locations: Locations | None,
) -> tuple[str, Path, dict[str, Any]]:
    """Write the next version directory; the caller holds the index directory's writer lock."""
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.rerank import save_locations

    sweep_temporaries(index_dir)
    version = next_version(index_dir)
    final = version_dir(index_dir, version)
    manifest = {**manifest, "version": version}
    with atomic_directory(final) as tmp:
        if ivfdata is not None:
            # The merged lists move in whole (one rename); the index file names them by basename and
            # is read with IO_FLAG_ONDISK_SAME_DIR, so the version directory can be renamed.
            os.rename(ivfdata, tmp / IVFDATA_FILE)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        manifest["index_sha256"] = hash_file(tmp / INDEX_FILE)
        index_file_bytes = (tmp / INDEX_FILE).stat().st_size
        ivfdata_bytes = (tmp / IVFDATA_FILE).stat().st_size if ivfdata is not None else 0
        # In memory when served: the index file (for on-disk lists: quantizer and list offsets only).
        manifest["index_bytes"] = index_file_bytes + ivfdata_bytes
        manifest["search_memory_bytes"] = index_file_bytes
        if locations is not None:
            save_locations(tmp, *locations)
        np.save(tmp / "eval_queries.npy", truth.queries)
        np.save(tmp / "eval_truth_ids.npy", truth.ids)
        np.save(tmp / "eval_truth_scores.npy", truth.scores)
        np.save(tmp / "deleted.npy", deleted)
        id_strings.save(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        lease.check()  # a writer whose lease was taken over must not publish
    return version, final, manifest


def _recall(
    index: faiss.Index, truth: ExactTopK, k: int, manifest: dict[str, Any], locations: Locations | None,
    factor: int,
) -> tuple[float | None, float | None]:
    """Recall@k of the index alone and, when it reranks, after the rerank against the float shards."""
    import numpy as np

    from airflow_outpost.runners.index.recall import recall_at_k
    from airflow_outpost.runners.index.rerank import Reranker, search_reranked

    if not len(truth.queries):
        return None, None
    _, found = index.search(truth.queries, k)
    plain = recall_at_k(found, truth.ids[:, :k])
    if locations is None:
        return plain, None
    reranker = Reranker(*locations, [Path(i["path"]) for i in manifest["inputs"]],
                        inner_product=manifest["metric"] == "ip")
    try:
        _, found = search_reranked(index, reranker, np.ascontiguousarray(truth.queries), k, factor)
    finally:
        reranker.close()
    return plain, recall_at_k(found, truth.ids[:, :k])


def _finish(
    index_dir: Path, index: faiss.Index, kind: str, params: dict[str, Any], truth: ExactTopK,
    config: IndexConfig, manifest: dict[str, Any], deleted: np.ndarray, id_strings: IdStrings,
    do_promote: bool, started: float, lock: LockSettings | None,
    ivfdata: Path | None = None, locations: Locations | None = None,
) -> IndexSummary:
    k = config.eval_k
    set_search_params(index, kind, params)
    manifest.update(metric=config.metric)
    plain, reranked = _recall(index, truth, k, manifest, locations, config.rerank_factor)
    recall = reranked if locations is not None else plain
    passed = recall is not None and recall >= config.min_recall
    if ivfdata is not None:
        manifest["ivfdata_sha256"] = hash_file(ivfdata)  # hashed before the lock: the file may be large
    manifest.update(
        kind=kind, params=params, dim=index.d, count=int(index.ntotal), on_disk=ivfdata is not None,
        rerank={"enabled": locations is not None, "factor": config.rerank_factor} if locations is not None else None,
        recall={"k": k, "queries": len(truth.queries), "value": recall, "without_rerank": plain,
                "min_recall": config.min_recall, "passed": passed},
        config=asdict(config), code_version=code_version(), build_seconds=round(time.perf_counter() - started, 3),
    )
    index_dir.mkdir(parents=True, exist_ok=True)
    # Version number, directory rename and promotion under one lock: the build itself ran unlocked.
    with writer_lock(index_dir, lock) as lease:
        version, path, manifest = _write_version(index_dir, index, truth, deleted, id_strings, manifest, lease, ivfdata,
                                                 locations)
        before = current_version(index_dir)
        if do_promote and passed:
            promote(index_dir, version, min_recall=config.min_recall)
        now_current = current_version(index_dir)
    log.info("index %s %s: %s, %d vectors, recall@%d=%s (without rerank %s; gate %.3f) -> %s", index_dir, version, kind,
             index.ntotal, k, recall, plain, config.min_recall, "promoted" if now_current == version else "not promoted")
    return {
        "version": version, "path": str(path), "index_dir": str(index_dir), "kind": kind, "count": int(index.ntotal),
        "dim": int(index.d), "recall": recall, "k": k, "min_recall": config.min_recall, "passed": passed,
        "promoted": now_current == version, "current": now_current,
        "previous": before, "mode": manifest["mode"], "seconds": manifest["build_seconds"],
        "engine": manifest.get("engine", "local"), "rerank": locations is not None, "recall_without_rerank": plain,
        "on_disk": ivfdata is not None, "index_bytes": int(manifest["index_bytes"]),
        "search_memory_bytes": int(manifest["search_memory_bytes"]),
    }


def _collect_strings(shards: list[Shard], excludes: list[np.ndarray]) -> IdStrings:
    """String ids of the indexed rows, from the ids files alone (no vectors read)."""
    import numpy as np

    from airflow_outpost.runners.index.id_strings import IdStringsBuilder
    from airflow_outpost.runners.index.shards import _load_ids_file, ids_to_int64

    builder = IdStringsBuilder()
    for shard, exclude in zip(shards, excludes, strict=True):
        ids, strings = ids_to_int64(_load_ids_file(shard.ids), path=shard.ids)
        if strings is None:
            continue
        keep = ~np.isin(ids, exclude) if exclude.size else np.ones(len(ids), dtype=bool)
        builder.add(ids[keep], [s for s, k in zip(strings, keep.tolist(), strict=True) if k])
    return builder.build()


def build_index(
    embeddings_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str], config: IndexConfig | None = None,
    *, queries: Any = None, auto_promote: bool = True, on_progress: ProgressFn | None = None,
    lock: LockSettings | None = None, engine: str = "local", ray_config: RayConfig | None = None,
) -> IndexSummary:
    """Build a new index version from every shard of ``embeddings_dir`` into ``index_dir``.

    With ``auto_promote`` (the default) the new version becomes ``current`` if its recall passes
    ``config.min_recall``; with ``auto_promote=False`` it is only written, for a later
    ``promote(index_dir, version)``. ``queries`` (array or .npy path) are the held-out evaluation
    queries; by default ``eval_queries`` rows are sampled from the data and kept out of IVF
    training. ``on_progress(done, total)`` is called after each added batch (each shard group
    for on-disk and Ray builds).

    ``engine="ray"`` trains once here on the sample, then adds shard groups as Ray tasks spread
    over the cluster's nodes (``ray_config``: ``RayConfig``, default ``RayConfig.from_env()``),
    each into a copy of the trained empty index and computing the eval queries' exact top-k over
    its rows; the parts are merged here (on disk with ``on_disk``). The shards must be at the
    same path on every node. The node ids of the adds are recorded in the version manifest
    (``ray.node_ids``). A task lost with its node is retried by Ray; if it cannot be, the build
    raises ``RayConnectError`` (retryable) and publishes nothing. Flat and IVF kinds only.

    Returns an ``IndexSummary`` (``version``, ``path``, ``count``, ``recall`` and
    ``recall_without_rerank``, ``index_bytes``, ``search_memory_bytes``, ``passed``,
    ``promoted``, ``current``...). Input errors (dimension mismatch naming the file, bad dtype)
    raise before anything is written. A cancel or crash leaves only ``.tmp-`` directories and
    ``current`` unchanged; retrying builds a fresh version (the next build sweeps the leftovers
    once their owner is gone).

    Concurrent builds compute in parallel; the version number, the rename into ``versions/`` and
    the promotion happen under the index directory's writer lock (``lock``: ``LockSettings``,
    default from ``OUTPOST_STORE_LOCK*``; StoreBusyError, retryable, after its timeout). Shards
    listed with a sha256 in the embeddings manifest are checked (ManifestError on a mismatch).
    """
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.exact_lists import add_batches
    from airflow_outpost.runners.index.id_strings import IdStringsBuilder
    from airflow_outpost.runners.index.parallel import group_shards, merge_parts, run_groups_local, run_groups_on_ray
    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.shards import (
        discover_shards,
        live_locations,
        located_batches,
        read_deleted_ids,
        sample_rows,
        shard_excludes,
    )

    if engine not in _ENGINES:
        raise SettingError(f"build_index: engine={engine!r} is invalid: must be one of {_ENGINES}")
    started = time.perf_counter()
    config = config or IndexConfig()
    emb_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    shards = discover_shards(emb_dir)
    dim = shards[0].dim
    deleted = read_deleted_ids(emb_dir)
    total = sum(s.rows for s in shards)
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    kind = choose_kind(config, total)
    grouped = engine == "ray" or config.on_disk
    if grouped and kind == "hnsw":
        raise SettingError(f"build_index: kind='hnsw' cannot be built with engine={engine!r} or on_disk "
                           "(HNSW graphs do not merge); use a flat or IVF kind")
    index, params = new_index(kind, dim, total, config)
    if queries is not None:
        q_vec = _queries_array(queries, dim)
        q_ids = np.empty(0, dtype=np.int64)
    else:
        q_ids, q_vec = sample_rows(shards, config.eval_queries, config.seed, exclude=deleted)
    gpu = use_gpu(config) and kind != "hnsw"
    if kind in IVF_KINDS:
        # Streamed sample: only the picked rows are read from the memory-mapped shards.
        _, sample = sample_rows(shards, params["train_rows"], config.seed + 1, exclude=np.union1d(deleted, q_ids))
        index = train(index, kind, sample, gpu)
        del sample
    excludes = shard_excludes(shards, deleted)
    truth_k = config.eval_k * _TRUTH_DEPTH
    truth = ExactTopK(q_vec, truth_k, _faiss_metric(config.metric))
    manifest: dict[str, Any] = {"engine": engine, "gpu": gpu}
    ivfdata: Path | None = None
    staging: Path | None = None
    try:
        if not grouped:
            strings_builder = IdStringsBuilder()
            work, on_gpu = to_device(index, kind, gpu)
            manifest["gpu"] = on_gpu

            def progress(done: int) -> None:
                log.info("index build %s: added %d/%d vectors", index_dir.name, done, total)
                if on_progress is not None:
                    on_progress(done, total)

            def first_pass(ids: np.ndarray, vectors: np.ndarray, strings: list[str] | None) -> None:
                # Ground truth rides on a pass the build makes anyway.
                truth.add(ids, vectors)
                if strings is not None:
                    strings_builder.add(ids, strings)

            def batches() -> Iterator[tuple[np.ndarray, np.ndarray, list[str] | None]]:
                for _, _, ids, vectors, strings in located_batches(shards, config.add_batch_rows, excludes):
                    yield ids, vectors, strings

            packed: list[IdStrings] = []
            # IVF lists sized once (exact_lists): the build holds the index, not its growth slack. The
            # strings are packed before the lists fill, so the sort's temporaries never meet the full index.
            add_batches(work, batches, on_first_pass=lambda batch: first_pass(*batch), on_progress=progress,
                        after_first_pass=lambda: packed.append(strings_builder.build()))
            index = faiss.index_gpu_to_cpu(work) if on_gpu else work
            id_strings = packed[0]
        else:
            index_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=temp_prefix(index_dir / "build"), dir=index_dir))
            trained = faiss.serialize_index(index)
            parts_wanted = math.ceil(total / config.group_rows)
            if engine == "ray":
                def make_jobs(cpus: int) -> list[Any]:
                    return group_shards(shards, excludes, config.shard_groups or max(cpus, parts_wanted), staging)

                results, address = run_groups_on_ray(trained, make_jobs, q_vec, truth_k, config.metric,
                                                      config.add_batch_rows, ray_config)
                manifest["ray"] = {
                    "address": address, "node_ids": sorted({r["node_id"] for r in results if r["node_id"]}),
                    "groups": [{k_: r[k_] for k_ in ("group", "rows", "node_id", "host", "pid", "shards", "seconds")}
                               for r in results],
                }
            else:
                jobs = group_shards(shards, excludes, config.shard_groups or parts_wanted, staging)
                results = []
                for result in run_groups_local(trained, jobs, q_vec, truth_k, config.metric, config.add_batch_rows):
                    results.append(result)
                    if on_progress is not None:
                        on_progress(sum(r["rows"] for r in results), total)
            for r in results:
                truth.merge(r["truth_ids"], r["truth_scores"])
            if config.on_disk:
                ivfdata = staging / IVFDATA_FILE
            index = merge_parts(index, kind, [r["path"] for r in results], ivfdata)
            for r in results:
                os.unlink(r["path"])
            id_strings = _collect_strings(shards, excludes)
        if index.ntotal == 0:
            raise InputError("no vectors left to index (every id is deleted)", path=str(emb_dir))
        locations = live_locations(shards, excludes) if config.reranks(kind) else None
        manifest.update({
            "mode": "rebuild", "base_version": None, "shards": [_shard_record(s, emb_dir) for s in shards],
            "embeddings": _embeddings_lineage(emb_dir), "deleted_ids": int(deleted.size),
        })
        manifest["inputs"] = [{"path": str(s.vectors.resolve()), "sha256": r["sha256"], "bytes": r["size"]}
                              for s, r in zip(shards, manifest["shards"], strict=True)]
        manifest["model"] = manifest["embeddings"].get("model")
        return _finish(index_dir, index, kind, params, truth, config, manifest, deleted, id_strings, auto_promote,
                       started, lock, ivfdata, locations)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _check_not_swapped(emb_dir: Path, index_dir: Path) -> None:
    """Refuse a 0.1-style ``update_index(index_dir, embeddings_dir)`` call before it does anything."""
    from airflow_outpost.runners.index.shards import has_shards

    found = []
    if is_index_dir(emb_dir):
        found.append(f"embeddings_dir={str(emb_dir)!r} is an index directory (it has {CURRENT} or {VERSIONS}/)")
    if has_shards(index_dir):
        found.append(f"index_dir={str(index_dir)!r} holds embedding shards (*.npy)")
    if found:
        raise SettingError(
            f"update_index: the arguments look swapped: {' and '.join(found)}. Since 0.2 the order is "
            "update_index(embeddings_dir, index_dir), source then target as in build_index "
            "(0.1 took update_index(index_dir, embeddings_dir))"
        )


def update_index(
    embeddings_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str], config: IndexConfig | None = None,
    *, auto_promote: bool = True, allow_rebuild: bool = True, on_progress: ProgressFn | None = None,
    lock: LockSettings | None = None, engine: str = "local", ray_config: RayConfig | None = None,
) -> IndexSummary:
    """Apply new shards and newly deleted ids of ``embeddings_dir`` to the current version in ``index_dir``.

    Source then target, as in ``build_index`` (0.1 took ``update_index(index_dir, embeddings_dir)``;
    a call whose ``embeddings_dir`` is an index directory or whose ``index_dir`` holds shards
    raises ``SettingError`` saying the arguments look swapped, before anything is read or written).
    Shards already in the current version are skipped; rows of new shards replace rows with
    the same id (upsert). The result is written as a new version and gated like a build, and
    promoted if it passes when ``auto_promote`` is set. Falls back to ``build_index``
    (``mode="rebuild"`` in the summary, with ``engine``/``ray_config`` as in ``build_index``) when
    a known shard changed or disappeared, deletions hit an HNSW index, or the current version
    keeps its lists on disk (they are rebuilt, never edited under a version readers may serve);
    with ``allow_rebuild=False`` that raises IndexStateError instead. A version that reranks
    keeps its id -> (shard, row) map up to date. ``config`` defaults to the current version's.

    Returns an ``IndexSummary`` like ``build_index``. A cancel or crash leaves ``current``
    unchanged and at most a ``.tmp-`` directory; retrying redoes the same delta.

    The whole update (reading the current version, applying the delta, publishing) holds the
    index directory's writer lock (``lock``, as in ``build_index``), so two updates never apply
    their deltas to the same base.
    """
    emb_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    _check_not_swapped(emb_dir, index_dir)
    with writer_lock(index_dir, lock):
        return _update_locked(emb_dir, index_dir, config, auto_promote, allow_rebuild, on_progress, lock, engine,
                              ray_config)


def _update_locked(
    emb_dir: Path, index_dir: Path, config: IndexConfig | None, auto_promote: bool, allow_rebuild: bool,
    on_progress: ProgressFn | None, lock: LockSettings | None, engine: str, ray_config: RayConfig | None,
) -> IndexSummary:
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.id_strings import IdStrings, IdStringsBuilder
    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.rerank import load_locations
    from airflow_outpost.runners.index.shards import (
        discover_shards,
        iter_batches,
        live_locations,
        read_deleted_ids,
        shard_excludes,
    )

    started = time.perf_counter()
    base = current_version(index_dir)
    if base is None:
        raise IndexStateError(f"{index_dir}: no current version to update; run build_index first")
    vm = read_version_manifest(index_dir, base)
    config = config or IndexConfig(**vm["config"])
    shards = discover_shards(emb_dir)
    for s in shards:
        if s.dim != vm["dim"]:
            raise DimensionMismatchError(f"{s.vectors}: vectors have dimension {s.dim}, the index has {vm['dim']}")
    known = {r["vectors"]: r for r in vm["shards"]}
    present = {s.vectors.relative_to(emb_dir).as_posix(): s for s in shards}
    changed = [n for n, r in known.items() if n not in present or
               (present[n].vectors.stat().st_size, present[n].vectors.stat().st_mtime_ns) != (r["size"], r["mtime_ns"])]
    new = [s for s in shards if s.vectors.relative_to(emb_dir).as_posix() not in known]
    vdir = version_dir(index_dir, base)
    old_deleted = np.load(vdir / "deleted.npy")
    all_deleted = read_deleted_ids(emb_dir)
    new_deleted = np.setdiff1d(all_deleted, old_deleted)
    kind = vm["kind"]
    reason = None
    if changed:
        reason = f"shards changed or removed since {base}: {changed[:5]}"
    elif kind == "hnsw" and new_deleted.size:
        reason = "HNSW indexes cannot remove vectors"
    elif vm.get("on_disk"):
        reason = f"{base} keeps its inverted lists on disk"
    if reason is not None:
        if not allow_rebuild:
            raise IndexStateError(f"{index_dir}: incremental update impossible ({reason}) and allow_rebuild=False")
        log.info("index %s: full rebuild because %s", index_dir, reason)
        return build_index(emb_dir, index_dir, config, auto_promote=auto_promote, on_progress=on_progress, lock=lock,
                           engine=engine, ray_config=ray_config)

    index = load_index(index_dir, base, vm)
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    if new_deleted.size:
        index.remove_ids(new_deleted)  # the Python wrapper takes an id array
    truth = ExactTopK(np.load(vdir / "eval_queries.npy"), config.eval_k * _TRUTH_DEPTH, _faiss_metric(config.metric))
    truth.ids, truth.scores = np.load(vdir / "eval_truth_ids.npy"), np.load(vdir / "eval_truth_scores.npy")
    id_strings = IdStrings.load(vdir)
    new_strings = IdStringsBuilder()
    removed = [new_deleted]
    added_batches: list[tuple[np.ndarray, np.ndarray]] = []
    total = sum(s.rows for s in new)
    done = 0
    for ids, vectors, strings in iter_batches(new, config.add_batch_rows, exclude=all_deleted):
        if kind != "hnsw":
            # Upsert: a re-embedded document replaces its old vector (the wrapper takes an id array).
            index.remove_ids(ids)
        index.add_with_ids(vectors, ids)
        removed.append(ids)
        added_batches.append((ids, vectors))
        if strings is not None:
            new_strings.add(ids, strings)
        done += len(ids)
        log.info("index update %s: added %d/%d vectors", index_dir.name, done, total)
        if on_progress is not None:
            on_progress(done, total)
    # Upserted strings win; deleted ids leave.
    id_strings = id_strings.updated(new_strings.build(), new_deleted)
    # Rows that left the truth lists are refilled from the deeper list; a full rescan only if it ran dry.
    truth.ids, truth.scores, valid = truth.without(np.concatenate(removed))
    if valid >= config.eval_k:
        for ids, vectors in added_batches:
            truth.add(ids, vectors)
    else:
        truth = ExactTopK(truth.queries, truth.k, truth.metric)
        for ids, vectors, _ in iter_batches(shards, config.add_batch_rows, exclude=all_deleted):
            truth.add(ids, vectors)
    records = list(vm["shards"]) + [_shard_record(s, emb_dir) for s in new]
    locations = None
    if (vm.get("rerank") or {}).get("enabled"):
        old_ids, old_shard, old_rows = load_locations(vdir)
        keep = ~np.isin(old_ids, np.concatenate(removed))
        new_ids, new_shard, new_rows = live_locations(new, shard_excludes(new, all_deleted), first_number=len(vm["shards"]))
        locations = (np.concatenate([old_ids[keep], new_ids]), np.concatenate([old_shard[keep], new_shard]),
                     np.concatenate([old_rows[keep], new_rows]))
    manifest: dict[str, Any] = {
        "mode": "incremental", "base_version": base, "engine": "local", "gpu": False, "shards": records,
        "embeddings": _embeddings_lineage(emb_dir), "deleted_ids": int(all_deleted.size),
        "added": done, "removed": int(new_deleted.size),
        "inputs": [{"path": str((emb_dir / r["vectors"]).resolve()), "sha256": r["sha256"], "bytes": r["size"]}
                   for r in records],
    }
    manifest["model"] = manifest["embeddings"].get("model")
    params = dict(vm["params"])
    if kind in IVF_KINDS:
        params["nprobe"] = config.nprobe
    elif kind == "hnsw":
        params["ef_search"] = config.hnsw_ef_search
    return _finish(index_dir, index, kind, params, truth, config, manifest, all_deleted, id_strings, auto_promote, started,
                   lock, None, locations)
