"""FAISS index rebuilds from embedding shards, with a recall gate, promotion, rollback and updates.

``build_index`` reads the shards of an embeddings directory in bounded batches, builds a Flat,
IVF or HNSW index, measures recall@k against exact search on held-out queries, writes a new
versioned directory atomically and promotes it to ``current`` only if recall passes the gate.
``update_index`` applies new shards and deleted ids to the current version without retraining
(Flat and IVF; HNSW cannot remove and falls back to a rebuild). Both take the source first, then
the target: ``(embeddings_dir, index_dir)``. Every call returns a small summary dict for XCom
(``airflow_outpost.runners.results.IndexSummary``: counts, version, recall, paths), never vectors.

Layout and promotion: see ``airflow_outpost.runners.index.versions``. GPU FAISS is used for training and
adding when a GPU build of FAISS and a GPU are present (``device="auto"``); HNSW and updates
run on CPU. FAISS and numpy are imported when a build runs, not with this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.errors import BackendUnavailableError, DimensionMismatchError, InputError, SettingError
from airflow_outpost.runners.index.versions import (
    CURRENT,
    INDEX_FILE,
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
from airflow_outpost.runners.store.atomic import atomic_directory
from airflow_outpost.runners.store.region_store import code_version, hash_file
from airflow_outpost.runners.store.writer_lock import LockSettings, WriterLease, writer_lock

if TYPE_CHECKING:
    import faiss
    import numpy as np

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
_KINDS = ("auto", "flat", "ivf", "hnsw")
_METRICS = ("ip", "l2")
# Exact truth is kept this many times deeper than k so deletions rarely force a full rescan.
_TRUTH_DEPTH = 4

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class IndexConfig:
    """How to build and gate an index. Invalid values raise ValueError naming the field.

    ``kind="auto"`` picks Flat up to ``flat_max_vectors`` rows and IVF above. ``nlist=None``
    sizes IVF at about 4*sqrt(n) lists. ``min_recall`` is the promotion gate for recall@``eval_k``
    measured on ``eval_queries`` held-out queries. ``threads=None`` leaves FAISS's default.
    """

    kind: str = "auto"
    metric: str = "ip"
    flat_max_vectors: int = 50_000
    nlist: int | None = None
    nprobe: int = 16
    train_sample: int | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    add_batch_rows: int = 65_536
    eval_queries: int = 200
    eval_k: int = 10
    min_recall: float = 0.9
    device: str = "auto"
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("kind", self.kind in _KINDS, f"one of {_KINDS}"),
            ("metric", self.metric in _METRICS, f"one of {_METRICS}"),
            ("device", self.device in ("auto", "cpu", "gpu"), "'auto', 'cpu' or 'gpu'"),
            ("min_recall", 0.0 <= self.min_recall <= 1.0, "in [0, 1]"),
            ("nlist", self.nlist is None or self.nlist >= 1, ">= 1 or None"),
        ]
        for name in ("nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "add_batch_rows", "eval_k"):
            checks.append((name, getattr(self, name) >= 1, ">= 1"))
        checks.append(("eval_queries", self.eval_queries >= 0, ">= 0"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"IndexConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")


def _faiss_metric(metric: str) -> int:
    import faiss

    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]


def _choose_kind(config: IndexConfig, n: int) -> str:
    if config.kind != "auto":
        return config.kind
    return "flat" if n <= config.flat_max_vectors else "ivf"


def _nlist(config: IndexConfig, n: int) -> int:
    if config.nlist is not None:
        return min(config.nlist, max(1, n))
    # FAISS wants >= 39 training points per list; stay within that for small sets.
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(target, 65_536, n // 40)))


def _use_gpu(config: IndexConfig) -> bool:
    import faiss

    available = faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_gpu")
    if config.device == "gpu" and not available:
        raise BackendUnavailableError("IndexConfig.device='gpu' but no GPU build of FAISS or no GPU is present")
    return available and config.device != "cpu"


def _new_index(kind: str, dim: int, n: int, config: IndexConfig) -> tuple[faiss.Index, dict[str, Any]]:
    import faiss

    metric = _faiss_metric(config.metric)
    if kind == "flat":
        return faiss.index_factory(dim, "IDMap2,Flat", metric), {}
    if kind == "ivf":
        nlist = _nlist(config, n)
        return faiss.index_factory(dim, f"IVF{nlist},Flat", metric), {"nlist": nlist, "nprobe": config.nprobe}
    index = faiss.index_factory(dim, f"IDMap2,HNSW{config.hnsw_m},Flat", metric)
    # IDMap2 -> the HNSW index inside it; faiss's SWIG stubs type every downcast as the base Index.
    idmap: Any = faiss.downcast_index(index)
    inner: Any = faiss.downcast_index(idmap.index)
    inner.hnsw.efConstruction = config.hnsw_ef_construction
    return index, {"M": config.hnsw_m, "ef_construction": config.hnsw_ef_construction, "ef_search": config.hnsw_ef_search}


def _set_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    if kind == "ivf":
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))


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
    id_strings: dict[int, str], manifest: dict[str, Any], lease: WriterLease,
) -> tuple[str, Path]:
    """Write the next version directory; the caller holds the index directory's writer lock."""
    import faiss
    import numpy as np

    sweep_temporaries(index_dir)
    version = next_version(index_dir)
    final = version_dir(index_dir, version)
    manifest = {**manifest, "version": version}
    with atomic_directory(final) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        manifest["index_sha256"] = hash_file(tmp / INDEX_FILE)
        np.save(tmp / "eval_queries.npy", truth.queries)
        np.save(tmp / "eval_truth_ids.npy", truth.ids)
        np.save(tmp / "eval_truth_scores.npy", truth.scores)
        np.save(tmp / "deleted.npy", deleted)
        if id_strings:
            keys = np.fromiter(id_strings.keys(), dtype=np.int64, count=len(id_strings))
            np.save(tmp / "id_keys.npy", keys)
            np.save(tmp / "id_strings.npy", np.array(list(id_strings.values()), dtype=str))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        lease.check()  # a writer whose lease was taken over must not publish
    return version, final


def _finish(
    index_dir: Path, index: faiss.Index, kind: str, params: dict[str, Any], truth: ExactTopK,
    config: IndexConfig, manifest: dict[str, Any], deleted: np.ndarray, id_strings: dict[int, str],
    do_promote: bool, started: float, lock: LockSettings | None,
) -> IndexSummary:
    from airflow_outpost.runners.index.recall import recall_at_k

    k = config.eval_k
    if len(truth.queries):
        _set_search_params(index, kind, params)
        _, found = index.search(truth.queries, k)
        recall = recall_at_k(found, truth.ids[:, :k])
    else:
        recall = None
    passed = recall is not None and recall >= config.min_recall
    manifest.update(
        kind=kind, params=params, metric=config.metric, dim=index.d, count=int(index.ntotal),
        recall={"k": k, "queries": len(truth.queries), "value": recall, "min_recall": config.min_recall, "passed": passed},
        config=asdict(config), code_version=code_version(), build_seconds=round(time.perf_counter() - started, 3),
    )
    index_dir.mkdir(parents=True, exist_ok=True)
    # Version number, directory rename and promotion under one lock: the build itself ran unlocked.
    with writer_lock(index_dir, lock) as lease:
        version, path = _write_version(index_dir, index, truth, deleted, id_strings, manifest, lease)
        before = current_version(index_dir)
        if do_promote and passed:
            promote(index_dir, version, min_recall=config.min_recall)
        now_current = current_version(index_dir)
    log.info("index %s %s: %d vectors, recall@%d=%s (gate %.3f) -> %s", index_dir, version, index.ntotal, k,
             recall, config.min_recall, "promoted" if now_current == version else "not promoted")
    return {
        "version": version, "path": str(path), "index_dir": str(index_dir), "kind": kind, "count": int(index.ntotal),
        "dim": int(index.d), "recall": recall, "k": k, "min_recall": config.min_recall, "passed": passed,
        "promoted": now_current == version, "current": now_current,
        "previous": before, "mode": manifest["mode"], "seconds": manifest["build_seconds"],
    }


def build_index(
    embeddings_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str], config: IndexConfig | None = None,
    *, queries: Any = None, auto_promote: bool = True, on_progress: ProgressFn | None = None,
    lock: LockSettings | None = None,
) -> IndexSummary:
    """Build a new index version from every shard of ``embeddings_dir`` into ``index_dir``.

    With ``auto_promote`` (the default) the new version becomes ``current`` if its recall passes
    ``config.min_recall``; with ``auto_promote=False`` it is only written, for a later
    ``promote(index_dir, version)``. ``queries`` (array or .npy path) are the held-out evaluation
    queries; by default ``eval_queries`` rows are sampled from the data and kept out of IVF
    training. ``on_progress(done, total)`` is called after each added batch.

    Returns an ``IndexSummary`` (``version``, ``path``, ``count``, ``recall``, ``passed``,
    ``promoted``, ``current``...). Input errors (dimension mismatch naming the file, bad dtype)
    raise before anything is written. A cancel or crash leaves only a ``.tmp-`` directory and
    ``current`` unchanged; retrying builds a fresh version (the next build sweeps the leftover
    once its owner is gone).

    Concurrent builds compute in parallel; the version number, the rename into ``versions/`` and
    the promotion happen under the index directory's writer lock (``lock``: ``LockSettings``,
    default from ``OUTPOST_STORE_LOCK*``; StoreBusyError, retryable, after its timeout). Shards
    listed with a sha256 in the embeddings manifest are checked (ManifestError on a mismatch).
    """
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.shards import discover_shards, iter_batches, read_deleted_ids, sample_rows

    started = time.perf_counter()
    config = config or IndexConfig()
    emb_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    shards = discover_shards(emb_dir)
    dim = shards[0].dim
    deleted = read_deleted_ids(emb_dir)
    total = sum(s.rows for s in shards)
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    kind = _choose_kind(config, total)
    index, params = _new_index(kind, dim, total, config)
    if queries is not None:
        q_vec = _queries_array(queries, dim)
        q_ids = np.empty(0, dtype=np.int64)
    else:
        q_ids, q_vec = sample_rows(shards, config.eval_queries, config.seed, exclude=deleted)
    gpu = _use_gpu(config) and kind != "hnsw"
    work = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index) if gpu else index
    if kind == "ivf":
        n_train = config.train_sample or min(total, max(64 * params["nlist"], 20_000))
        _, train = sample_rows(shards, n_train, config.seed + 1, exclude=np.union1d(deleted, q_ids))
        log.info("training IVF%d on %d sampled vectors", params["nlist"], len(train))
        work.train(train)
        del train
    truth = ExactTopK(q_vec, config.eval_k * _TRUTH_DEPTH, _faiss_metric(config.metric))
    id_strings: dict[int, str] = {}
    done = 0
    for ids, vectors, strings in iter_batches(shards, config.add_batch_rows, exclude=deleted):
        work.add_with_ids(vectors, ids)
        # Ground truth rides on the same pass, so the data is read once.
        truth.add(ids, vectors)
        if strings is not None:
            id_strings.update(zip(ids.tolist(), strings, strict=True))
        done += len(ids)
        log.info("index build %s: added %d/%d vectors", index_dir.name, done, total)
        if on_progress is not None:
            on_progress(done, total)
    if done == 0:
        raise InputError("no vectors left to index (every id is deleted)", path=str(emb_dir))
    index = faiss.index_gpu_to_cpu(work) if gpu else work
    manifest: dict[str, Any] = {
        "mode": "rebuild", "base_version": None, "gpu": gpu, "shards": [_shard_record(s, emb_dir) for s in shards],
        "embeddings": _embeddings_lineage(emb_dir), "deleted_ids": int(deleted.size),
    }
    manifest["inputs"] = [{"path": str(s.vectors.resolve()), "sha256": r["sha256"], "bytes": r["size"]}
                          for s, r in zip(shards, manifest["shards"], strict=True)]
    manifest["model"] = manifest["embeddings"].get("model")
    return _finish(index_dir, index, kind, params, truth, config, manifest, deleted, id_strings, auto_promote, started,
                   lock)


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
    lock: LockSettings | None = None,
) -> IndexSummary:
    """Apply new shards and newly deleted ids of ``embeddings_dir`` to the current version in ``index_dir``.

    Source then target, as in ``build_index`` (0.1 took ``update_index(index_dir, embeddings_dir)``;
    a call whose ``embeddings_dir`` is an index directory or whose ``index_dir`` holds shards
    raises ``SettingError`` saying the arguments look swapped, before anything is read or written).
    Shards already in the current version are skipped; rows of new shards replace rows with
    the same id (upsert). The result is written as a new version and gated like a build, and
    promoted if it passes when ``auto_promote`` is set. Falls back to ``build_index``
    (``mode="rebuild"`` in the summary) when a known shard changed or disappeared, or deletions
    hit an HNSW index; with ``allow_rebuild=False`` that raises IndexStateError instead.
    ``config`` defaults to the current version's.

    Returns an ``IndexSummary`` like ``build_index``. A cancel or crash leaves ``current``
    unchanged and at most a ``.tmp-`` directory; retrying redoes the same delta.

    The whole update (reading the current version, applying the delta, publishing) holds the
    index directory's writer lock (``lock``, as in ``build_index``), so two updates never apply
    their deltas to the same base.
    """
    emb_dir, index_dir = Path(embeddings_dir), Path(index_dir)
    _check_not_swapped(emb_dir, index_dir)
    with writer_lock(index_dir, lock):
        return _update_locked(emb_dir, index_dir, config, auto_promote, allow_rebuild, on_progress, lock)


def _update_locked(
    emb_dir: Path, index_dir: Path, config: IndexConfig | None, auto_promote: bool, allow_rebuild: bool,
    on_progress: ProgressFn | None, lock: LockSettings | None,
) -> IndexSummary:
    import faiss
    import numpy as np

    from airflow_outpost.runners.index.recall import ExactTopK
    from airflow_outpost.runners.index.shards import discover_shards, iter_batches, read_deleted_ids

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
    if reason is not None:
        if not allow_rebuild:
            raise IndexStateError(f"{index_dir}: incremental update impossible ({reason}) and allow_rebuild=False")
        log.info("index %s: full rebuild because %s", index_dir, reason)
        return build_index(emb_dir, index_dir, config, auto_promote=auto_promote, on_progress=on_progress, lock=lock)

    index = load_index(index_dir, base, vm)
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    if new_deleted.size:
        index.remove_ids(new_deleted)  # the Python wrapper takes an id array
    truth = ExactTopK(np.load(vdir / "eval_queries.npy"), config.eval_k * _TRUTH_DEPTH, _faiss_metric(config.metric))
    truth.ids, truth.scores = np.load(vdir / "eval_truth_ids.npy"), np.load(vdir / "eval_truth_scores.npy")
    id_strings = _load_id_strings(vdir)
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
            id_strings.update(zip(ids.tolist(), strings, strict=True))
        done += len(ids)
        log.info("index update %s: added %d/%d vectors", index_dir.name, done, total)
        if on_progress is not None:
            on_progress(done, total)
    for key in new_deleted.tolist():
        id_strings.pop(key, None)
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
    manifest: dict[str, Any] = {
        "mode": "incremental", "base_version": base, "gpu": False, "shards": records,
        "embeddings": _embeddings_lineage(emb_dir), "deleted_ids": int(all_deleted.size),
        "added": done, "removed": int(new_deleted.size),
        "inputs": [{"path": str((emb_dir / r["vectors"]).resolve()), "sha256": r["sha256"], "bytes": r["size"]}
                   for r in records],
    }
    manifest["model"] = manifest["embeddings"].get("model")
    params = dict(vm["params"])
    if kind == "ivf":
        params["nprobe"] = config.nprobe
    elif kind == "hnsw":
        params["ef_search"] = config.hnsw_ef_search
    return _finish(index_dir, index, kind, params, truth, config, manifest, all_deleted, id_strings, auto_promote, started,
                   lock)


def _load_id_strings(vdir: Path) -> dict[int, str]:
    import numpy as np

    if not (vdir / "id_keys.npy").is_file():
        return {}
    keys = np.load(vdir / "id_keys.npy")
    values = np.load(vdir / "id_strings.npy")
    return dict(zip(keys.tolist(), values.tolist(), strict=True))
