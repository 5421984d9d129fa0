"""Incremental, idempotent corpus embedding into the region-local store.

``embed_corpus(corpus_path, store=..., name=..., model=...)`` reads and validates the whole
corpus, chunks every document with the model's tokenizer, and embeds only the chunks whose
(content hash, embedding settings) are not already live in ``embeddings/<name>``. Re-running
on an unchanged corpus does no model work and writes nothing.

Layout under ``<store>/embeddings/<name>/``::

    manifest.json                 commit point: current version, dim, dtype, lineage, history
    shards/shard-v000003.npy      vectors embedded in version 3 (float32 or float16)
    shards/shard-v000003.ids.json chunk ids of those rows, in order
    catalog-v000003.parquet       every live chunk: chunk_id, key, doc_id, doc_hash, chunk_index, start,
                                  end, content_hash, shard, row, text
    changes-v000003.json          what version 3 changed: added / updated / deleted chunk ids
                                  (with int64 keys) and deleted document ids

``key`` is a stable signed 64-bit id per chunk id, for FAISS ``IndexIDMap``. To follow
changes incrementally, an index applies each version's changes file in order: remove the
keys in ``deleted`` and ``updated``, then add the rows for ``added`` and ``updated`` (their
vectors are located through the catalog: ``read_vectors``).

Every file is published atomically and under a versioned name; the manifest is replaced last,
so a crash leaves the previous version readable and a retry redoes the interrupted version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from airflow_outpost.runners.embeddings.chunking import ChunkingConfig, chunk_text
from airflow_outpost.runners.embeddings.documents import read_documents
from airflow_outpost.runners.embeddings.embedder import Embedder
from airflow_outpost.runners.errors import DimensionMismatchError, ManifestError
from airflow_outpost.runners.results import BackendInfo, EmbedSummary, ModelLineage
from airflow_outpost.runners.store.atomic import atomic_write_json, atomic_writer, sweep_orphans
from airflow_outpost.runners.store.region_store import (
    Store,
    code_version,
    hash_file,
    hash_text,
    input_record,
    verify_file,
)
from airflow_outpost.runners.store.writer_lock import LockSettings

if TYPE_CHECKING:
    import numpy as np

KIND = "embeddings"
DTYPES = ("float32", "float16")


def chunk_key(chunk_id: str) -> int:
    """Stable signed int64 id for a chunk id (first 8 bytes of its SHA-256, top bit cleared)."""
    return int.from_bytes(hashlib.sha256(chunk_id.encode()).digest()[:8], "big") & (2**63 - 1)


def embedding_settings_hash(embedder: Embedder, dtype: str) -> str:
    """Hash of everything besides the text that decides a vector: model weights, output form."""
    desc = {"weights": embedder.record["weights_sha256"], "normalize": embedder.normalize,
            "max_seq_length": embedder.max_seq_length, "dtype": dtype}
    return hash_text(json.dumps(desc, sort_keys=True))


_CHUNK_FIELDS = ("chunk_id", "key", "doc_id", "doc_hash", "chunk_index", "start", "end", "content_hash", "text")


def _read_catalog(store: Store, name: str, manifest: dict[str, Any] | None) -> dict[str, dict]:
    if manifest is None:
        return {}
    import pyarrow.parquet as pq

    path = store.path(KIND, name, manifest["catalog"])
    verify_file(path, manifest.get("catalog_sha256"), "catalog")
    try:
        rows = pq.read_table(path).to_pylist()
    except OSError as exc:
        raise ManifestError(f"{path}: catalog referenced by the manifest is unreadable: {exc}") from exc
    return {r["chunk_id"]: r for r in rows}


def read_catalog(store: Store, name: str) -> list[dict[str, Any]]:
    """Every live chunk of ``embeddings/<name>`` (dicts with the catalog columns); [] if none.

    How a DAG turns the chunk ids that ``QueryRetriever`` or ``IndexSearcher`` return back into
    texts and document ids. Reads only the catalog the manifest names, so it never sees a
    half-written version.
    """
    return list(_read_catalog(store, name, store.read_manifest(KIND, name)).values())


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
    catalog = _read_catalog(store, name, manifest)
    wanted = list(catalog) if chunk_ids is None else chunk_ids
    dim = manifest["dim"] if manifest else 0
    dtype = manifest["dtype"] if manifest else "float32"
    vectors = np.empty((len(wanted), dim), dtype=dtype)
    shards: dict[str, np.ndarray] = {}
    recorded = {e["file"]: e.get("sha256") for e in manifest["shards"]} if manifest else {}
    for i, cid in enumerate(wanted):
        row = catalog[cid]
        if row["shard"] not in shards:
            path = store.path(KIND, name, *row["shard"].split("/"))
            if row["shard"] not in recorded:
                raise ManifestError(f"{path}: the catalog names a shard that the manifest does not list")
            verify_file(path, recorded[row["shard"]], "vector shard")
            shards[row["shard"]] = np.load(path, mmap_mode="r")
        vectors[i] = shards[row["shard"]][row["row"]]
    keys = np.array([catalog[c]["key"] for c in wanted], dtype=np.int64)
    return wanted, keys, vectors


def embed_corpus(
    corpus_path: str | os.PathLike[str],
    *,
    store: Store | str | os.PathLike[str] | None = None,
    name: str | None = None,
    model: str | os.PathLike[str] | None = None,
    embedder: Embedder | None = None,
    chunking: ChunkingConfig | None = None,
    dtype: str = "float32",
    encoder: str = "auto",
    lock: LockSettings | None = None,
    **embedder_kwargs: Any,
) -> EmbedSummary:
    """Bring ``embeddings/<name>`` up to date with the corpus; return an ``EmbedSummary`` for XCom.

    ``store``: a Store, a root path, or None (``OUTPOST_STORE_ROOT``). ``name`` defaults to the
    corpus file stem. Pass a loaded ``embedder`` to reuse it (``model`` and
    ``embedder_kwargs`` are then ignored). ``dtype`` is the shard dtype (float32/float16).
    ``encoder``: ``"local"`` loads the model in this process, ``"service"`` uses the worker's
    warm model service, ``"auto"`` the service inside a worker task (see ``airflow_outpost.runners.model_service.client``).

    The summary holds counts, checksums, model, code version and ``file://`` URIs, never texts
    or vectors. Idempotent: an unchanged corpus does no model work and writes nothing
    (``changed: False``). All validation (input rows, model path, vector dimension) happens
    before any write, so a bad input raises a ``RunnerError`` and leaves the store untouched.
    Cancelling mid-run leaves the previous version intact; re-running finishes the job.

    Concurrent runs on one name (overlapping DAG runs, several hosts on a shared store) take
    turns: the version is allocated and published under the name's writer lock (``lock``:
    ``LockSettings``, default from ``OUTPOST_STORE_LOCK*``); a run that waits longer than its
    timeout raises StoreBusyError (retryable) naming the holder. Each run diffs against the
    version published before it, so versions stay gapless and every manifest is consistent.
    """
    import numpy as np

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
    store = store if isinstance(store, Store) else Store(store)
    corpus = Path(corpus_path)
    name = name or corpus.stem
    manifest_path = store.manifest_path(KIND, name)  # validates the name before any work
    docs = read_documents(corpus)
    if embedder is None:
        from airflow_outpost.runners.model_service.client import make_embedder

        embedder = make_embedder(model, encoder=encoder, **embedder_kwargs)
    chunking = (chunking or ChunkingConfig()).resolved(embedder.max_seq_length - 2)
    # One writer per name: version allocation, the writes and the publish happen under the lock,
    # after the model is loaded and the corpus read (those need no lock).
    with store.writer_lock(KIND, name, lock) as lease:
        sweep_orphans(store.path(KIND, name), writer_lock_held=True)
        previous = store.read_manifest(KIND, name)
        if previous is not None and previous["dim"] != embedder.dim:
            raise DimensionMismatchError(
                f"{manifest_path}: existing shards have dimension {previous['dim']}, model "
                f"{embedder.record['path']} produces {embedder.dim}; use another name"
            )
        settings = embedding_settings_hash(embedder, dtype)
        old = _read_catalog(store, name, previous)
        reusable = previous is not None and previous.get("embedding_settings") == settings
        by_hash = {r["content_hash"]: r for r in old.values()} if reusable else {}

        # Tokenizing every document is most of a small refresh, so an unchanged document (same
        # text hash, same chunking) keeps its previous chunk rows instead of being cut again.
        same_chunking = previous is not None and previous.get("chunking") == chunking.as_dict()
        old_by_doc: dict[str, list[dict[str, Any]]] = {}
        if same_chunking:
            for r in old.values():
                if r.get("doc_hash"):
                    old_by_doc.setdefault(r["doc_id"], []).append(r)
        current: dict[str, dict[str, Any]] = {}
        for doc in docs:
            doc_hash = hash_text(doc.text)
            kept = old_by_doc.get(doc.id)
            if kept and kept[0]["doc_hash"] == doc_hash:
                for r in sorted(kept, key=lambda r: r["chunk_index"]):
                    current[r["chunk_id"]] = {k: r[k] for k in _CHUNK_FIELDS}
                continue
            for ch in chunk_text(embedder.tokenizer, doc.text, chunking):
                cid = f"{doc.id}#{ch.index}"
                current[cid] = {"chunk_id": cid, "key": chunk_key(cid), "doc_id": doc.id, "doc_hash": doc_hash,
                                "chunk_index": ch.index, "start": ch.start, "end": ch.end,
                                "content_hash": hash_text(ch.text), "text": ch.text}
        added = [c for c in current if c not in old]
        updated = [c for c in current if c in old and (
            not reusable or old[c]["content_hash"] != current[c]["content_hash"])]
        deleted = [c for c in old if c not in current]
        old_docs = {r["doc_id"] for r in old.values()}
        deleted_docs = sorted(old_docs - {d.id for d in docs})

        # Only content never embedded with these settings goes through the model.
        todo = [c for c in added + updated if current[c]["content_hash"] not in by_hash]
        unique: dict[str, str] = {}
        for cid in todo:
            unique.setdefault(current[cid]["content_hash"], current[cid]["text"])
        vectors = embedder.embed(list(unique.values())) if unique else np.zeros((0, embedder.dim))

        for cid, row in current.items():
            if cid in old and cid not in updated:
                row.update(shard=old[cid]["shard"], row=old[cid]["row"])
            elif row["content_hash"] in by_hash:
                src = by_hash[row["content_hash"]]
                row.update(shard=src["shard"], row=src["row"])

        lineage: ModelLineage = {"name": embedder.record["name"], "revision": embedder.record["revision"],
                                 "weights_sha256": embedder.record["weights_sha256"]}
        backend = cast(BackendInfo, {k: v for k, v in embedder.describe().items() if k != "model"})

        def summary(changed: bool, version: int, catalog_sha256: str) -> EmbedSummary:
            return {
                "name": name, "documents": len(docs), "chunks": len(current),
                "embedded": len(unique), "reused": len(added) + len(updated) - len(todo),
                "added": len(added), "updated": len(updated), "deleted": len(deleted),
                "deleted_documents": len(deleted_docs), "dim": embedder.dim, "dtype": dtype,
                "model": lineage, "backend": backend, "code_version": code_version(),
                "manifest_uri": store.uri(manifest_path),
                "changed": changed, "version": version, "catalog_sha256": catalog_sha256,
            }

        if previous is not None and not (added or updated or deleted):
            return summary(False, previous["version"], previous["catalog_sha256"])

        version = (previous["version"] + 1) if previous else 1
        tag = f"v{version:06d}"
        written: dict[str, str] = {}
        if unique:
            shard = f"shards/shard-{tag}.npy"
            # Shard rows follow the unique contents; every chunk id sharing a content points at it.
            hashes = list(unique)
            with atomic_writer(store.path(KIND, name, "shards", f"shard-{tag}.npy")) as fh:
                np.save(fh, vectors.astype(dtype), allow_pickle=False)
            first_id: dict[str, str] = {}
            for cid in todo:
                first_id.setdefault(current[cid]["content_hash"], cid)
            atomic_write_json(store.path(KIND, name, "shards", f"shard-{tag}.ids.json"),
                              [first_id[h] for h in hashes])
            index = {h: i for i, h in enumerate(hashes)}
            for cid in todo:
                current[cid].update(shard=shard, row=index[current[cid]["content_hash"]])
            written["shard"] = shard

        catalog_name = f"catalog-{tag}.parquet"
        _write_catalog(store.path(KIND, name, catalog_name), list(current.values()))
        changes_name = f"changes-{tag}.json"
        changes = {
            "version": version, "previous_version": previous["version"] if previous else None,
            "added": added, "updated": updated, "deleted": deleted,
            "added_keys": [current[c]["key"] for c in added],
            "updated_keys": [current[c]["key"] for c in updated],
            "deleted_keys": [old[c]["key"] for c in deleted],
            "deleted_documents": deleted_docs, "shard": written.get("shard"),
        }
        atomic_write_json(store.path(KIND, name, changes_name), changes)

        catalog_sha = hash_file(store.path(KIND, name, catalog_name))
        shard_entries = list(previous["shards"]) if previous else []
        if "shard" in written:
            shard_path = store.path(KIND, name, *written["shard"].split("/"))
            shard_entries.append({"file": written["shard"], "vectors": written["shard"], "ids": written["shard"][:-4] + ".ids.json",
                                  "rows": int(vectors.shape[0]), "version": version,
                                  "sha256": hash_file(shard_path)})
        history = list(previous["history"]) if previous else []
        history.append({"version": version, "changes": changes_name, "added": len(added),
                        "updated": len(updated), "deleted": len(deleted)})
        body = {
            "version": version, "dim": embedder.dim, "dtype": dtype,
            "normalized": embedder.normalize, "embedding_settings": settings,
            "chunking": chunking.as_dict(), "embedder": embedder.describe(),
            "catalog": catalog_name, "catalog_sha256": catalog_sha, "changes": changes_name,
            "shards": shard_entries, "history": history,
            # Chunk ids removed so far and not live again; the index runner excludes them.
            "deleted_ids": sorted((set(previous.get("deleted_ids", [])) if previous else set())
                                  .union(deleted).difference(current)),
            "counts": {"documents": len(docs), "chunks": len(current)},
        }
        lease.check()  # a writer whose lease was taken over must not publish
        store.write_manifest(KIND, name, body, inputs=[input_record(corpus)], model=embedder.record)
        out = summary(True, version, catalog_sha)
        out["catalog_uri"] = store.uri(store.path(KIND, name, catalog_name))
        out["changes_uri"] = store.uri(store.path(KIND, name, changes_name))
        if "shard" in written:
            out["shard_uri"] = store.uri(store.path(KIND, name, *written["shard"].split("/")))
            out["shard_sha256"] = shard_entries[-1]["sha256"]
        return out


def _write_catalog(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("chunk_id", pa.string()), ("key", pa.int64()), ("doc_id", pa.string()),
                        ("doc_hash", pa.string()), ("chunk_index", pa.int32()), ("start", pa.int64()), ("end", pa.int64()),
                        ("content_hash", pa.string()), ("shard", pa.string()),
                        ("row", pa.int64()), ("text", pa.large_string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_writer(path) as fh:
        pq.write_table(table, fh)
