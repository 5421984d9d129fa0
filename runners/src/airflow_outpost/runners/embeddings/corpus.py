"""Streaming, resumable, incremental corpus embedding into the region-local store.

``embed_corpus(corpus_path, store=..., name=..., model=...)`` brings ``embeddings/<name>`` up to
date with a corpus: one JSONL/Parquet file or a directory of them (partitions). It streams: each
partition is read in batches, chunked with the model's tokenizer, hashed, diffed against the
previous version's rows of the same partition, and only chunks whose (content hash, embedding
settings) are new go through the model, in shards of at most ``EmbedConfig.shard_rows`` vectors.
Memory is bounded by a batch, a shard and one partition's index, never by the corpus.
``engine="local"`` runs it in this process, ``engine="ray"`` across a Ray cluster
(``airflow_outpost.runners.embeddings.engines``); both write the same files.

Layout under ``<store>/embeddings/<name>/``::

    manifest.json                   commit point: current version, dim, dtype, lineage, shards, history
    catalog-v000003.json            version 3's catalog: its partitions' parts, with sha256 and counts
    catalog/part-<key>.parquet      one partition's live chunks: chunk_id, key, doc_id, doc_hash,
                                    chunk_index, start, end, content_hash, shard, row, text
    catalog/part-<key>.json         that partition's commit record: changes, counts, its shards
    shards/<key>-00000.npy          vectors (float32 or float16), with .ids.json (chunk ids of the
                                    rows) and .meta.json (node that wrote it, model and input hashes)
    changes-v000003.json            what version 3 changed: added / updated / deleted chunk ids
                                    (with int64 keys) and deleted document ids

``<key>`` names what produced a part or shard: the partition's input hash, the embedding settings,
the chunking, the code version and the previous catalog part it was diffed against. A run that
dies leaves whole shards and parts under those names; its retry computes the same keys and
reuses them (``resumed`` in the summary). An unchanged partition keeps its part as it is.

``key`` is a stable signed 64-bit id per chunk id, for FAISS ``IndexIDMap``. To follow changes
incrementally, an index applies each version's changes file in order: remove the keys in
``deleted`` and ``updated``, then add the rows for ``added`` and ``updated``. The manifest's
``shards`` lists every shard in the order written, so a later shard's row for a chunk id wins.

The version readers see is published last, under the name's writer lock: catalog listing, changes
file, then the manifest in one rename; a crash leaves the previous version readable. Versions
written by the single-catalog layout of earlier releases (``catalog-v*.parquet``) stay readable
and are diffed against as one partition.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.embeddings.chunking import ChunkingConfig
from airflow_outpost.runners.embeddings.documents import list_corpus
from airflow_outpost.runners.embeddings.engines import ENGINES, EmbedConfig, LocalEngine, RayEngine
from airflow_outpost.runners.embeddings.partitions import (
    PartitionPlan,
    PartitionResult,
    chunk_key,
    partition_key,
)
from airflow_outpost.runners.embeddings.unpublished import sweep_unpublished
from airflow_outpost.runners.errors import DimensionMismatchError, DuplicateIdError, EmptyCorpusError, ManifestError
from airflow_outpost.runners.results import BackendInfo, EmbedSummary, ModelLineage
from airflow_outpost.runners.store.atomic import atomic_write_json, atomic_writer, sweep_orphans
from airflow_outpost.runners.store.region_store import Store, code_version, hash_file, hash_text, verify_file
from airflow_outpost.runners.store.writer_lock import LockSettings

if TYPE_CHECKING:
    import numpy as np

__all__ = ["EmbedConfig", "chunk_key", "embed_corpus", "iter_catalog", "read_catalog", "read_vectors"]

KIND = "embeddings"
# The change lists of a partition's commit record: read back from disk when the version is written.
_CHANGE_LISTS = ("added", "updated", "deleted", "deleted_documents")
DTYPES = ("float32", "float16")


def embedding_settings_hash(record: dict[str, Any], normalize: bool, max_seq_length: int, dtype: str) -> str:
    """Hash of everything besides the text that decides a vector: model weights, output form."""
    desc = {"weights": record["weights_sha256"], "normalize": normalize, "max_seq_length": max_seq_length,
            "dtype": dtype}
    return hash_text(json.dumps(desc, sort_keys=True))


def _catalog_parts(store: Store, name: str, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The catalog parts of a published version: ``[{file, sha256, partition, ...}]``."""
    if manifest is None:
        return []
    path = store.path(KIND, name, manifest["catalog"])
    verify_file(path, manifest.get("catalog_sha256"), "catalog")
    if manifest["catalog"].endswith(".parquet"):  # the single-catalog layout of earlier releases
        return [{"file": manifest["catalog"], "sha256": manifest.get("catalog_sha256"), "partition": "",
                 "legacy": True, "rows": manifest.get("counts", {}).get("chunks"),
                 "documents": manifest.get("counts", {}).get("documents")}]
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["parts"])
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"{path}: catalog listing referenced by the manifest is unreadable: {exc}") from exc


def iter_catalog(store: Store, name: str, *, batch_rows: int = 65536) -> Iterator[dict[str, Any]]:
    """Stream every live chunk of ``embeddings/<name>`` (dicts with the catalog columns), part by part.

    Reads only what the manifest names, each part checked against its recorded sha256.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for part in _catalog_parts(store, name, store.read_manifest(KIND, name)):
        path = store.path(KIND, name, *part["file"].split("/"))
        verify_file(path, part.get("sha256"), "catalog")
        try:
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
                yield from rb.to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise ManifestError(f"{path}: catalog referenced by the manifest is unreadable: {exc}") from exc


def read_catalog(store: Store, name: str) -> list[dict[str, Any]]:
    """Every live chunk of ``embeddings/<name>`` (dicts with the catalog columns); [] if none.

    How a DAG turns the chunk ids that ``QueryRetriever`` or ``IndexSearcher`` return back into
    texts and document ids. Reads only the catalog the manifest names, so it never sees a
    half-written version. ``iter_catalog`` streams the same rows.
    """
    return list(iter_catalog(store, name))


def read_vectors(
    store: Store, name: str, chunk_ids: list[str] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return ``(chunk_ids, keys int64, vectors)`` for the live chunks (all, or the given ids).

    Reads only; shards are memory-mapped, so asking for a few ids is cheap. The catalog and
    every shard read are checked against the sha256 the manifest records (ManifestError if one
    belongs to another version), never trusted by name.
    """
    import numpy as np

    manifest = store.read_manifest(KIND, name)
    catalog = {r["chunk_id"]: (r["key"], r["shard"], r["row"]) for r in iter_catalog(store, name)}
    wanted = list(catalog) if chunk_ids is None else chunk_ids
    dim = manifest["dim"] if manifest else 0
    dtype = manifest["dtype"] if manifest else "float32"
    vectors = np.empty((len(wanted), dim), dtype=dtype)
    shards: dict[str, np.ndarray] = {}
    recorded = {e["file"]: e.get("sha256") for e in manifest["shards"]} if manifest else {}
    for i, cid in enumerate(wanted):
        _, shard, row = catalog[cid]
        if shard not in shards:
            path = store.path(KIND, name, *shard.split("/"))
            if shard not in recorded:
                raise ManifestError(f"{path}: the catalog names a shard that the manifest does not list")
            verify_file(path, recorded[shard], "vector shard")
            shards[shard] = np.load(path, mmap_mode="r")
        vectors[i] = shards[shard][row]
    keys = np.array([catalog[c][0] for c in wanted], dtype=np.int64)
    return wanted, keys, vectors


class _Given:
    """A factory that hands out an embedder the caller built (pickled to Ray actors as it is)."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder

    def __call__(self) -> Any:
        return self.embedder


def embed_corpus(
    corpus_path: str | os.PathLike[str],
    *,
    store: Store | str | os.PathLike[str] | None = None,
    name: str | None = None,
    model: str | os.PathLike[str] | None = None,
    embedder: Any | None = None,
    chunking: ChunkingConfig | None = None,
    dtype: str = "float32",
    encoder: str = "auto",
    lock: LockSettings | None = None,
    engine: str = "local",
    ray_config: RayConfig | None = None,
    config: EmbedConfig | None = None,
    **embedder_kwargs: Any,
) -> EmbedSummary:
    """Bring ``embeddings/<name>`` up to date with the corpus; return an ``EmbedSummary`` for XCom.

    ``corpus_path``: a JSONL/Parquet file or a directory of them (each file a partition).
    ``store``: a Store, a root path, or None (``OUTPOST_STORE_ROOT``). ``name`` defaults to the
    corpus file stem (directory name). Pass a loaded ``embedder`` to reuse it (``model`` and
    ``embedder_kwargs`` are then ignored; with ``engine="ray"`` it is pickled to each actor, and
    an ``Embedder`` reloads its model there). ``dtype`` is the shard dtype (float32/float16).
    ``encoder``: ``"local"`` loads the model in this process, ``"service"`` uses the worker's
    warm model service, ``"auto"`` the service inside a worker task (engine "local" only).
    ``engine``: ``"local"`` (one process) or ``"ray"`` (``ray_config``: a ``RayConfig``, default
    ``RayConfig.from_env()``: the worker's ``--ray``, an existing cluster, or a Ray of its own).
    ``config``: ``EmbedConfig`` (shard size, read batch, actors).

    The summary holds counts, checksums, model, code version and ``file://`` URIs, never texts
    or vectors. Idempotent: an unchanged corpus does no model work and writes nothing
    (``changed: False``). Every input row is validated (and document ids checked unique across
    partitions) before any write, so a bad input raises a ``RunnerError`` and leaves the store
    untouched. A run that fails or is cancelled mid-way keeps the shards it committed and the
    previous version readable; re-running finishes the job, embedding only what is missing
    (``resumed`` counts the chunks taken from the interrupted run).

    Concurrent runs on one name (overlapping DAG runs, several hosts on a shared store) take
    turns: the version is computed and published under the name's writer lock (``lock``:
    ``LockSettings``, default from ``OUTPOST_STORE_LOCK*``); a run that waits longer than its
    timeout raises StoreBusyError (retryable) naming the holder. Each run diffs against the
    version published before it, so versions stay gapless and every manifest is consistent.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not allowed; use one of {', '.join(ENGINES)}")
    config = config or EmbedConfig()
    store = store if isinstance(store, Store) else Store(store)
    corpus = Path(corpus_path)
    name = name or (corpus.stem if corpus.is_file() or corpus.suffix else corpus.name)
    manifest_path = store.manifest_path(KIND, name)  # validates the name before any work
    partitions = list_corpus(corpus)
    with contextlib.ExitStack() as stack:
        runner: LocalEngine | RayEngine
        if engine == "ray":
            if embedder is not None:
                factory: Any = _Given(embedder)
            else:
                from airflow_outpost.runners.embeddings.embedder import Embedder

                factory = functools.partial(Embedder, model, **{"multi_gpu": False, **embedder_kwargs})
            runner = RayEngine(factory, dtype, ray_config, config, stack)
        else:
            if embedder is None:
                from airflow_outpost.runners.model_service.client import make_embedder

                embedder = make_embedder(model, encoder=encoder, **embedder_kwargs)
            runner = LocalEngine(_Given(embedder), dtype)
        info = runner.info()
        resolved = (chunking or ChunkingConfig()).resolved(info["max_seq_length"] - 2)
        scans = runner.scan([str(p.path) for p in partitions], config.read_rows)
        if not any(s["documents"] for s in scans):
            raise EmptyCorpusError("corpus holds no documents", path=str(corpus))
        _check_unique_ids(partitions, scans)
        with store.writer_lock(KIND, name, lock) as lease:
            return _publish(store, name, manifest_path, partitions, scans, info, resolved, dtype, config,
                            runner, lease)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _check_unique_ids(partitions: list[Any], scans: list[dict[str, Any]]) -> None:
    """Refuse a document id used in two partitions. Sorted hashes only (8 bytes a document);
    which partitions share it is looked up only when one is found. Drops the hashes after."""
    import numpy as np

    hashes = [s.pop("id_hashes") for s in scans]
    if len(hashes) < 2:
        return
    merged = np.sort(np.concatenate(hashes))
    dup = np.nonzero(merged[1:] == merged[:-1])[0]
    if dup.size:
        value = merged[dup[0]]
        owners = [i for i, h in enumerate(hashes) if np.isin(value, h)]
        a, b = partitions[owners[0]], partitions[owners[-1]]
        raise DuplicateIdError(f"a document id of {a.path} is used again in another partition", path=str(b.path))


def _publish(store: Store, name: str, manifest_path: Path, partitions: list[Any], scans: list[dict[str, Any]],
             info: dict[str, Any], chunking: ChunkingConfig, dtype: str, config: EmbedConfig,
             runner: LocalEngine | RayEngine, lease: Any) -> EmbedSummary:
    root = store.path(KIND, name)
    sweep_orphans(root, writer_lock_held=True)
    previous = store.read_manifest(KIND, name)
    if previous is not None and previous["dim"] != info["dim"]:
        raise DimensionMismatchError(
            f"{manifest_path}: existing shards have dimension {previous['dim']}, model "
            f"{info['record']['path']} produces {info['dim']}; use another name"
        )
    settings = embedding_settings_hash(info["record"], info["normalize"], info["max_seq_length"], dtype)
    old_parts = {p["partition"]: p for p in _catalog_parts(store, name, previous)}
    reuse_vectors = previous is not None and previous.get("embedding_settings") == settings
    reuse_chunks = reuse_vectors and previous is not None and previous.get("chunking") == chunking.as_dict()
    code = code_version()
    parts: list[dict[str, Any]] = []
    plans: list[PartitionPlan] = []
    for part, scan in zip(partitions, scans, strict=True):
        old = old_parts.get(part.id)
        if old is not None and reuse_chunks and old.get("input_sha256") == scan["input_sha256"]:
            parts.append(old)  # unchanged input, same settings: its part stands as it is
            continue
        old_sha = old.get("sha256") if old else None
        key = partition_key(part.id, scan["input_sha256"], settings, chunking, code, old_sha)
        plans.append(PartitionPlan(part.id, str(part.path.resolve()), scan["input_sha256"], key, str(root),
                                   old["file"] if old else None, old_sha, reuse_vectors, reuse_chunks, chunking,
                                   config.shard_rows, config.read_rows))
        parts.append({"partition": part.id, "key": key})
    removed = [p for pid, p in old_parts.items() if pid not in {x.id for x in partitions}]

    lineage: ModelLineage = {"name": info["record"]["name"], "revision": info["record"]["revision"],
                             "weights_sha256": info["record"]["weights_sha256"]}
    backend = cast(BackendInfo, {k: v for k, v in info["describe"].items() if k != "model"})
    totals = {"embedded": 0, "reused": 0, "resumed": 0, "shards": 0}
    counts = {"added": 0, "updated": 0, "deleted": 0, "deleted_documents": 0}
    new_shards: list[dict[str, Any]] = []
    # Each partition's commit record without its change lists, which stay on disk (changes.py).
    done: dict[str, dict[str, Any]] = {}

    def summary(changed: bool, version: int, catalog_sha256: str) -> EmbedSummary:
        return {
            "name": name, "documents": sum(s["documents"] for s in scans),
            "chunks": sum(int(p["rows"]) for p in parts), "partitions": len(partitions),
            "embedded": totals["embedded"], "reused": totals["reused"], "resumed": totals["resumed"],
            "added": counts["added"], "updated": counts["updated"], "deleted": counts["deleted"],
            "deleted_documents": counts["deleted_documents"], "dim": info["dim"], "dtype": dtype,
            "model": lineage, "backend": backend, "code_version": code_version(),
            "manifest_uri": store.uri(manifest_path), "engine": runner.name,
            "changed": changed, "version": version, "catalog_sha256": catalog_sha256,
        }

    if previous is not None and not plans and not removed:
        return summary(False, previous["version"], previous["catalog_sha256"])

    def on_partition(plan: PartitionPlan, result: PartitionResult, records: list[dict[str, Any]]) -> None:
        body = {"partition": plan.part_id, "source": plan.source, "input_sha256": plan.input_sha256,
                "key": plan.key, "file": result.catalog_file, "sha256": result.catalog_sha256,
                "rows": result.chunks, "documents": result.documents, "settings": settings,
                "chunking": chunking.as_dict(), "catalog_node": result.node, "embedded": result.embedded,
                "reused": result.reused, "added": result.added, "updated": result.updated,
                "deleted": result.deleted, "deleted_documents": result.deleted_documents,
                "shards": [{k: v for k, v in r.items() if k != "resumed"} for r in records],
                "resumed_rows": sum(r["rows"] for r in records if r["resumed"])}
        # The partition's commit record: written after its catalog part and every shard.
        atomic_write_json(root / plan.done_file, body)
        done[plan.key] = {k: v for k, v in body.items() if k not in _CHANGE_LISTS}

    todo = []
    for plan in plans:
        record = root / plan.done_file
        if record.is_file():  # committed by an interrupted run: reuse it whole
            body = {k: v for k, v in json.loads(record.read_text(encoding="utf-8")).items() if k not in _CHANGE_LISTS}
            body["resumed_rows"] = sum(s["rows"] for s in body["shards"])
            done[plan.key] = body
        else:
            todo.append(plan)
    if todo:
        runner.run(todo, info["tokenizer"], on_partition)

    slot = {p.get("key"): i for i, p in enumerate(parts)}
    for plan in plans:
        body = done[plan.key]
        totals["resumed"] += body["resumed_rows"]
        totals["embedded"] += body["embedded"] - body["resumed_rows"]
        totals["reused"] += body["reused"]
        totals["shards"] += len(body["shards"])
        new_shards.extend(body["shards"])
        parts[slot[plan.key]] = {k: body[k] for k in ("partition", "source", "input_sha256", "key", "file", "sha256",
                                                      "rows", "documents", "settings", "chunking", "catalog_node")}

    from airflow_outpost.runners.embeddings.changes import ChangeRecord, VersionChanges  # numpy: imported late

    def committed(plan: PartitionPlan) -> ChangeRecord:
        return json.loads((root / plan.done_file).read_text(encoding="utf-8"))

    def gone(old: dict[str, Any]) -> ChangeRecord:  # a partition file that is gone: all its chunks are deleted
        rows = list(_iter_part(store, name, old))
        return {"added": [], "updated": [], "deleted": [[r["chunk_id"], r["key"]] for r in rows],
                "deleted_documents": sorted({r["doc_id"] for r in rows})}

    changes = VersionChanges([*(functools.partial(committed, p) for p in plans),
                              *(functools.partial(gone, old) for old in removed)])
    counts.update(changes.counts, deleted_documents=len(changes.deleted_documents))

    version = (previous["version"] + 1) if previous else 1
    tag = f"v{version:06d}"
    catalog_name = f"catalog-{tag}.json"
    atomic_write_json(root / catalog_name, {"version": version, "parts": parts})
    changes_name = f"changes-{tag}.json"
    with atomic_writer(root / changes_name) as fh:
        changes.write(fh, version=version, previous_version=previous["version"] if previous else None,
                      shards=[s["file"] for s in new_shards])
    catalog_sha = hash_file(root / catalog_name)
    shard_entries = list(previous["shards"]) if previous else []
    shard_entries.extend({**s, "version": version} for s in new_shards)
    history = list(previous["history"]) if previous else []
    history.append({"version": version, "changes": changes_name, "added": counts["added"],
                    "updated": counts["updated"], "deleted": counts["deleted"]})
    body = {
        "version": version, "dim": info["dim"], "dtype": dtype,
        "normalized": info["normalize"], "embedding_settings": settings,
        "chunking": chunking.as_dict(), "embedder": info["describe"],
        "catalog": catalog_name, "catalog_sha256": catalog_sha, "changes": changes_name,
        "shards": shard_entries, "history": history, "engine": runner.name,
        # Chunk ids removed so far and not live again; the index runner excludes them.
        "deleted_ids": changes.deleted_ids(previous.get("deleted_ids", []) if previous else []),
        "counts": {"documents": sum(s["documents"] for s in scans), "chunks": sum(int(p["rows"]) for p in parts),
                   "partitions": len(partitions)},
    }
    inputs = [{"path": str(p.path.resolve()), "sha256": s["input_sha256"], "bytes": p.path.stat().st_size}
              for p, s in zip(partitions, scans, strict=True)]
    lease.check()  # a writer whose lease was taken over must not publish
    store.write_manifest(KIND, name, body, inputs=inputs, model=info["record"])
    sweep_unpublished(root, body, config.keep_unpublished_s)
    out = summary(True, version, catalog_sha)
    out["catalog_uri"] = store.uri(root / catalog_name)
    out["changes_uri"] = store.uri(root / changes_name)
    out["shards_written"] = totals["shards"]
    return out


def _iter_part(store: Store, name: str, part: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = store.path(KIND, name, *part["file"].split("/"))
    verify_file(path, part.get("sha256"), "catalog")
    for rb in pq.ParquetFile(path).iter_batches(columns=["chunk_id", "key", "doc_id"]):
        yield from rb.to_pylist()
