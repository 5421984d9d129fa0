"""The per-partition steps of ``embed_corpus``, the same on both engines.

* ``scan_partition``: read and validate one input file (the pass that runs before any write),
  returning its content hash, its document count and the 64-bit hashes of its document ids.
* ``chunk_partition``: a generator over one partition. It streams the documents in batches,
  chunks and hashes them, diffs them against the previous version's catalog part of the same
  partition, writes the new catalog part (Parquet, incrementally, committed at the end) and
  yields a ``ShardJob`` for every ``shard_rows`` texts that need the model, then one
  ``PartitionResult``. Where a vector lands (shard file and row) is decided here, before any
  vector exists, so the catalog never waits for the model.
* ``ShardEncoder``: the stateful callable that embeds one ``ShardJob`` and commits its shard
  (ids, then a small sidecar, then the ``.npy``: the commit point, temp + fsync + rename) from
  the process that computed it. In-process for ``engine="local"``, a Ray actor for ``"ray"``.

Everything a partition writes is named by its ``key``: a hash of the partition's input hash, the
embedding settings, the chunking, the code version and the previous catalog part it was diffed
against. A retry of an unfinished run therefore computes the same names and reuses every shard
already committed (``ShardJob.texts is None``) instead of embedding it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_outpost.runners.embeddings.chunking import ChunkingConfig, chunk_text
from airflow_outpost.runners.embeddings.documents import iter_documents
from airflow_outpost.runners.store.atomic import atomic_write_bytes, atomic_write_json, atomic_writer
from airflow_outpost.runners.store.region_store import hash_bytes, hash_file, hash_text, verify_file

CATALOG_FIELDS = ("chunk_id", "key", "doc_id", "doc_hash", "chunk_index", "start", "end", "content_hash",
                  "shard", "row", "text")


def chunk_key(chunk_id: str) -> int:
    """Stable signed int64 id for a chunk id (first 8 bytes of its SHA-256, top bit cleared)."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode()).digest()[:8], "big") & (2**63 - 1)


def catalog_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("chunk_id", pa.string()), ("key", pa.int64()), ("doc_id", pa.string()),
                      ("doc_hash", pa.string()), ("chunk_index", pa.int32()), ("start", pa.int64()),
                      ("end", pa.int64()), ("content_hash", pa.string()), ("shard", pa.string()),
                      ("row", pa.int64()), ("text", pa.large_string())])


def node_identity() -> dict[str, str]:
    """Where this code runs: the Ray node id inside a Ray worker (``"local"`` outside), and the host."""
    node = "local"
    # Looked up, not imported: a process that never imported Ray is not in a Ray worker, and a
    # local run should not pay Ray's import for the answer.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return {"node_id": node, "host": socket.gethostname()}


def scan_partition(path: str, read_rows: int) -> dict[str, Any]:
    """Validate every row of one partition; return ``{input_sha256, documents, id_hashes}``.

    ``id_hashes`` is a sorted uint64 array (8 bytes per document) for the cross-partition
    duplicate check. Raises the ``InputError`` family naming file and row. Reads only.
    """
    import numpy as np

    hashes: list[int] = []
    seen_rows: dict[str, int] = {}
    for batch in iter_documents(path, read_rows):
        for doc in batch:
            hashes.append(doc_id_hash(doc.id))
            seen_rows.setdefault(doc.id, doc.row)
    arr = np.sort(np.asarray(hashes, dtype=np.uint64))
    if len(seen_rows) != len(hashes):
        from airflow_outpost.runners.errors import DuplicateIdError

        first = _first_duplicate(path, read_rows)
        raise DuplicateIdError(f"id {first[0]!r} already used at row {first[1]}", path=path, row=first[2])
    return {"input_sha256": hash_file(path), "documents": len(hashes), "id_hashes": arr}


def _first_duplicate(path: str, read_rows: int) -> tuple[str, int, int]:
    seen: dict[str, int] = {}
    for batch in iter_documents(path, read_rows):
        for doc in batch:
            if doc.id in seen:
                return doc.id, seen[doc.id], doc.row
            seen[doc.id] = doc.row
    raise AssertionError("no duplicate found on the second pass")  # pragma: no cover


def doc_id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class PartitionPlan:
    """What one partition task needs; small and picklable (it travels to Ray workers)."""

    part_id: str
    source: str
    input_sha256: str
    key: str
    root: str  # <store>/embeddings/<name>
    old_part: str | None  # previous version's catalog part of this partition (relative to root)
    old_part_sha256: str | None
    reuse_vectors: bool  # the previous version used the same embedding settings
    reuse_chunks: bool  # ... and the same chunking, so an unchanged document keeps its rows
    chunking: ChunkingConfig
    shard_rows: int
    read_rows: int

    @property
    def catalog_file(self) -> str:
        return f"catalog/part-{self.key}.parquet"

    @property
    def done_file(self) -> str:
        return f"catalog/part-{self.key}.json"

    def shard_file(self, k: int) -> str:
        return f"shards/{self.key}-{k:05d}.npy"


def partition_key(part_id: str, input_sha256: str, settings: str, chunking: ChunkingConfig, code: str,
                  old_part_sha256: str | None) -> str:
    desc = {"partition": part_id, "input": input_sha256, "settings": settings, "chunking": chunking.as_dict(),
            "code": code, "previous": old_part_sha256}
    return hash_text(json.dumps(desc, sort_keys=True)).split(":")[-1][:24]


@dataclass
class ShardJob:
    """``rows`` texts for one shard file; ``texts is None`` when an earlier try already committed it."""

    root: str
    file: str
    ids: list[str]
    texts: list[str] | None
    partition: str
    input_sha256: str


@dataclass
class PartitionResult:
    """What a partition changed. Change lists are ``(chunk_id, key)`` pairs; sizes are what changed."""

    part_id: str
    catalog_file: str
    catalog_sha256: str
    chunks: int
    documents: int
    added: list[tuple[str, int]] = field(default_factory=list)
    updated: list[tuple[str, int]] = field(default_factory=list)
    deleted: list[tuple[str, int]] = field(default_factory=list)
    deleted_documents: list[str] = field(default_factory=list)
    embedded: int = 0  # unique texts assigned to new shard rows
    reused: int = 0  # new or changed chunks whose vector already existed
    node: dict[str, str] = field(default_factory=dict)


def _read_old_part(root: Path, plan: PartitionPlan) -> list[dict[str, Any]]:
    if plan.old_part is None:
        return []
    import pyarrow.parquet as pq

    path = root / plan.old_part
    verify_file(path, plan.old_part_sha256, "catalog")
    return pq.read_table(path).to_pylist()


def chunk_partition(plan: PartitionPlan, tokenizer: Any) -> Iterator[ShardJob | PartitionResult]:
    """Diff, chunk and catalog one partition; yield its ``ShardJob``s, then its ``PartitionResult``.

    Memory: one read batch, one shard of texts, and per-partition maps (previous rows of this
    partition, content hash -> row); never the corpus. The catalog part is committed last, so a
    partition whose generator did not finish leaves no catalog part, only whole shards.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(plan.root)
    old = {r["chunk_id"]: r for r in _read_old_part(root, plan)}
    by_hash = {r["content_hash"]: (r["shard"], r["row"]) for r in old.values()} if plan.reuse_vectors else {}
    old_by_doc: dict[str, list[dict[str, Any]]] = {}
    if plan.reuse_chunks:
        for r in old.values():
            old_by_doc.setdefault(r["doc_id"], []).append(r)
    result = PartitionResult(plan.part_id, plan.catalog_file, "", 0, 0, node=node_identity())
    assigned: dict[str, tuple[str, int]] = {}
    pending_ids: list[str] = []
    pending_texts: list[str] = []
    current: set[str] = set()
    docs: set[str] = set()
    schema = catalog_schema()

    def flush_shard() -> ShardJob:
        nonlocal pending_ids, pending_texts
        file = plan.shard_file(len(assigned_shards))
        done = (root / file).is_file() and (root / _sidecar(file)).is_file()
        job = ShardJob(plan.root, file, pending_ids, None if done else pending_texts, plan.part_id, plan.input_sha256)
        assigned_shards.append(file)
        pending_ids, pending_texts = [], []
        return job

    assigned_shards: list[str] = []
    with atomic_writer(root / plan.catalog_file) as fh, pq.ParquetWriter(fh, schema) as writer:
        for batch in iter_documents(plan.source, plan.read_rows):
            rows: list[dict[str, Any]] = []
            for doc in batch:
                docs.add(doc.id)
                doc_hash = hash_text(doc.text)
                kept = old_by_doc.get(doc.id)
                if kept and kept[0]["doc_hash"] == doc_hash:
                    # Tokenizing is most of a small refresh: an unchanged document keeps its rows.
                    for r in sorted(kept, key=lambda r: r["chunk_index"]):
                        rows.append({k: r[k] for k in CATALOG_FIELDS})
                        current.add(r["chunk_id"])
                    continue
                for ch in chunk_text(tokenizer, doc.text, plan.chunking):
                    cid = f"{doc.id}#{ch.index}"
                    h, key = hash_text(ch.text), chunk_key(cid)
                    row: dict[str, Any] = {"chunk_id": cid, "key": key, "doc_id": doc.id, "doc_hash": doc_hash,
                                           "chunk_index": ch.index, "start": ch.start, "end": ch.end,
                                           "content_hash": h, "text": ch.text}
                    current.add(cid)
                    prev = old.get(cid)
                    if prev is not None and plan.reuse_vectors and prev["content_hash"] == h:
                        row.update(shard=prev["shard"], row=prev["row"])
                    else:
                        (result.added if prev is None else result.updated).append((cid, key))
                        if h in by_hash or h in assigned:
                            row["shard"], row["row"] = by_hash.get(h) or assigned[h]
                            result.reused += h in by_hash
                        else:
                            assigned[h] = (plan.shard_file(len(assigned_shards)), len(pending_texts))
                            row["shard"], row["row"] = assigned[h]
                            pending_ids.append(cid)
                            pending_texts.append(ch.text)
                            result.embedded += 1
                            if len(pending_texts) >= plan.shard_rows:
                                yield flush_shard()
                    rows.append(row)
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                result.chunks += len(rows)
        if pending_texts:
            yield flush_shard()
    result.documents = len(docs)
    result.catalog_sha256 = hash_file(root / plan.catalog_file)
    for cid, r in old.items():
        if cid not in current:
            result.deleted.append((cid, r["key"]))
    result.deleted_documents = sorted({r["doc_id"] for r in old.values()} - docs)
    yield result


def _sidecar(shard_file: str) -> str:
    return shard_file[: -len(".npy")] + ".meta.json"


def ids_file(shard_file: str) -> str:
    return shard_file[: -len(".npy")] + ".ids.json"


class ShardEncoder:
    """Embeds ``ShardJob``s and commits each shard where it was computed; one per process or actor.

    ``factory()`` builds the embedder (once, here), so the same class runs in-process and as a
    Ray actor, on CPU or on a GPU. ``__call__(job)`` returns the shard's manifest entry: file
    names, rows, sha256, the node that wrote it, and the model and input hashes. A job whose
    shard was committed by an earlier try is not embedded again (``resumed: True``).
    """

    def __init__(self, factory: Callable[[], Any], dtype: str) -> None:
        self.embedder = factory()
        self.dtype = dtype

    def info(self) -> dict[str, Any]:
        e = self.embedder
        return {"dim": e.dim, "normalize": e.normalize, "max_seq_length": e.max_seq_length,
                "record": dict(e.record), "describe": e.describe(), "tokenizer": e.tokenizer}

    def __call__(self, job: ShardJob) -> dict[str, Any]:
        import numpy as np

        root = Path(job.root)
        if job.texts is None:
            meta = json.loads((root / _sidecar(job.file)).read_text(encoding="utf-8"))
            return {**meta, "resumed": True}
        vectors = np.ascontiguousarray(self.embedder.embed(job.texts), dtype=self.dtype)
        buf = io.BytesIO()
        np.save(buf, vectors, allow_pickle=False)
        data = buf.getvalue()
        meta = {"file": job.file, "vectors": job.file, "ids": ids_file(job.file), "rows": len(job.texts),
                "sha256": hash_bytes(data), "partition": job.partition, "input_sha256": job.input_sha256,
                "model_weights_sha256": self.embedder.record["weights_sha256"], **node_identity(),
                "pid": os.getpid()}
        # ids and sidecar first, the vectors last: an existing .npy means the whole shard is there.
        atomic_write_json(root / ids_file(job.file), job.ids)
        atomic_write_json(root / _sidecar(job.file), meta)
        atomic_write_bytes(root / job.file, data)
        return {**meta, "resumed": False}
