"""Reading embedding shards for index builds: discovery, validation and bounded-memory batches.

An embeddings directory holds vector shards ``<stem>.npy`` (2-D, float32 or float16) and, next
to each, the document ids of its rows: ``<stem>.ids.npy`` (integers or strings) or
``<stem>.ids.json`` (a JSON list). Deleted documents are listed in ``deleted_ids.json`` or
``deleted_ids.npy``, or under ``deleted_ids`` in ``manifest.json`` (all are honoured).
If ``manifest.json`` lists ``shards`` (``[{"vectors": ..., "ids": ...}]``), that list is the
authority and stray files are ignored; otherwise every ``*.npy`` that is not an ids file is a shard.

FAISS needs int64 ids. Integer ids are used as they are; string ids are mapped to a stable
63-bit hash (the embeddings catalog's ``key``) and the mapping is kept by the index, so searches can return the strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from airflow_outpost.runners.errors import DimensionMismatchError, InputError
from airflow_outpost.runners.index.npy_rows import NpyRows
from airflow_outpost.runners.store.atomic import TMP_PREFIX
from airflow_outpost.runners.store.region_store import verify_file

_VECTOR_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True)
class Shard:
    """One vector file and its ids file; ``rows``/``dim``/``dtype`` come from the .npy header."""

    vectors: Path
    ids: Path
    rows: int
    dim: int
    dtype: str


def string_id_to_int(doc_id: str) -> int:
    """Stable non-negative 63-bit integer for a string id.

    The same formula as ``airflow_outpost.runners.embeddings.corpus.chunk_key`` (first 8 bytes of SHA-256, big-endian,
    top bit cleared), so index ids equal the ``key`` column of the embeddings catalog.
    """
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def ids_to_int64(raw: np.ndarray, *, path: Path) -> tuple[np.ndarray, list[str] | None]:
    """Return (int64 ids, original strings or None). Rejects ids that are neither ints nor strings."""
    if raw.dtype.kind in "iu":
        if raw.size and (raw.min() < 0 or (raw.dtype.kind == "u" and raw.max() > np.iinfo(np.int64).max)):
            raise InputError("integer ids must be in [0, 2**63)", path=str(path))
        return raw.astype(np.int64, copy=False), None
    if raw.dtype.kind in "UO":
        strings = [str(x) for x in raw.tolist()]
        return np.fromiter((string_id_to_int(s) for s in strings), dtype=np.int64, count=len(strings)), strings
    raise InputError(f"ids have dtype {raw.dtype}; expected integers or strings", path=str(path))


def _load_ids_file(path: Path) -> np.ndarray:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read ids: {exc}", path=str(path)) from exc
        if not isinstance(data, list):
            raise InputError("ids file must hold a JSON list", path=str(path))
        return np.asarray(data)
    # allow_pickle stays off: object arrays from untrusted shards would execute code on load.
    return np.load(path, allow_pickle=False)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable .npy array: {exc}", path=str(path)) from exc
    return arr.shape, arr.dtype


def _manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read embeddings manifest: {exc}", path=str(path)) from exc
    return obj if isinstance(obj, dict) else {}


def _ids_path_for(vectors: Path) -> Path:
    stem = vectors.name[: -len(".npy")]
    for candidate in (vectors.with_name(stem + ".ids.npy"), vectors.with_name(stem + ".ids.json")):
        if candidate.is_file():
            return candidate
    raise InputError("no ids file next to this shard (expected <stem>.ids.npy or .ids.json)", path=str(vectors))


def discover_shards(directory: str | Path) -> list[Shard]:
    """List and validate the shards of an embeddings directory, reading only .npy headers.

    Raises InputError (unreadable file, wrong dtype, ids/rows count mismatch, no shards),
    ManifestError (a listed shard's content differs from the sha256 the manifest records) or
    DimensionMismatchError naming the first shard whose dimension differs from the first one.
    Nothing is written.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError("embeddings directory does not exist", path=str(root))
    listed = _manifest(root).get("shards")
    pairs: list[tuple[Path, Path]] = []
    if isinstance(listed, list) and listed:
        for entry in listed:
            vec = root / entry["vectors"]
            # A manifest that records a shard's hash is the authority: another version's file is refused.
            verify_file(vec, entry.get("sha256"), "vector shard")
            pairs.append((vec, root / entry["ids"] if entry.get("ids") else _ids_path_for(vec)))
    else:
        for vec in sorted(root.glob("*.npy")):
            if vec.name.startswith((TMP_PREFIX, ".")) or vec.name.endswith(".ids.npy") or vec.name == "deleted_ids.npy":
                continue
            pairs.append((vec, _ids_path_for(vec)))
    if not pairs:
        raise InputError("no vector shards (*.npy) found", path=str(root))

    shards: list[Shard] = []
    for vec, ids in pairs:
        shape, dtype = _npy_header(vec)
        if len(shape) != 2:
            raise InputError(f"vector shard must be 2-D, got shape {shape}", path=str(vec))
        if dtype not in _VECTOR_DTYPES:
            raise InputError(f"vector dtype {dtype} is not float32 or float16", path=str(vec))
        if shards and shape[1] != shards[0].dim:
            raise DimensionMismatchError(
                f"{vec}: vectors have dimension {shape[1]}, but {shards[0].vectors.name} has {shards[0].dim}"
            )
        n_ids = len(_load_ids_file(ids))
        if n_ids != shape[0]:
            raise InputError(f"{n_ids} ids for {shape[0]} vectors in {vec.name}", path=str(ids))
        shards.append(Shard(vectors=vec, ids=ids, rows=int(shape[0]), dim=int(shape[1]), dtype=str(dtype)))
    return shards


def has_shards(directory: str | Path) -> bool:
    """True if ``directory`` holds vector files in either layout above (``*.npy``, or ``shards/*.npy``
    as ``embed_corpus`` writes them). Looks at names only; an index directory never has either."""
    root = Path(directory)
    return any(root.glob("*.npy")) or any(root.glob("shards/*.npy"))


def read_deleted_ids(directory: str | Path) -> np.ndarray:
    """All deleted document ids of an embeddings directory, as sorted unique int64."""
    root = Path(directory)
    raw: list[Any] = list(_manifest(root).get("deleted_ids") or [])
    if (root / "deleted_ids.json").is_file():
        raw.extend(_load_ids_file(root / "deleted_ids.json").tolist())
    if (root / "deleted_ids.npy").is_file():
        raw.extend(np.load(root / "deleted_ids.npy", allow_pickle=False).tolist())
    if not raw:
        return np.empty(0, dtype=np.int64)
    ids, _ = ids_to_int64(np.asarray(raw), path=root)
    return np.unique(ids)


def superseded_ids(shards: list[Shard]) -> list[np.ndarray]:
    """Per shard, the ids that a later shard holds again (an updated document: the later row wins)."""
    later = np.empty(0, dtype=np.int64)
    out: list[np.ndarray] = []
    for shard in reversed(shards):
        ids, _ = ids_to_int64(_load_ids_file(shard.ids), path=shard.ids)
        out.append(np.intersect1d(ids, later))
        later = np.union1d(later, ids)
    return out[::-1]


def shard_excludes(shards: list[Shard], exclude: np.ndarray | None = None, *, latest_only: bool = True) -> list[np.ndarray]:
    """Per shard, the sorted ids whose rows are not indexed: ``exclude`` plus, with ``latest_only``,
    the ids a later shard holds again. Computed over all shards at once, so that groups of
    shards built apart (``engine="ray"``) drop the same rows as one pass would."""
    base = exclude if exclude is not None else np.empty(0, dtype=np.int64)
    if not latest_only:
        return [base] * len(shards)
    return [np.union1d(base, sup) if sup.size else base for sup in superseded_ids(shards)]


def located_batches(
    shards: list[Shard], batch_rows: int, excludes: list[np.ndarray], *, shard_numbers: list[int] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, list[str] | None]]:
    """Yield ``(shard number, row numbers, ids, float32 vectors, strings or None)`` of at most ``batch_rows``.

    Like ``iter_batches`` with the rows' places in their shards, for the rerank map.
    ``excludes[i]`` (sorted int64) are dropped from shard ``i``; ``shard_numbers`` renumbers.
    """
    numbers = shard_numbers if shard_numbers is not None else list(range(len(shards)))
    for number, shard, exclude in zip(numbers, shards, excludes, strict=True):
        ids, strings = ids_to_int64(_load_ids_file(shard.ids), path=shard.ids)
        # Read, not memory-mapped (npy_rows): the process holds one batch, not the shard's pages.
        with NpyRows(shard.vectors) as vectors:
            for start in range(0, shard.rows, batch_rows):
                stop = min(start + batch_rows, shard.rows)
                rows = np.arange(start, stop, dtype=np.int64)
                batch_ids = ids[start:stop]
                batch_vec = vectors.range(start, stop)
                batch_str = strings[start:stop] if strings is not None else None
                if exclude.size:
                    keep = ~np.isin(batch_ids, exclude, assume_unique=False)
                    if not keep.all():
                        rows, batch_ids, batch_vec = rows[keep], batch_ids[keep], batch_vec[keep]
                        batch_str = [s for s, k in zip(batch_str, keep, strict=True) if k] if batch_str is not None else None
                if len(batch_ids):
                    yield number, rows, batch_ids, batch_vec, batch_str


def iter_batches(
    shards: Iterable[Shard], batch_rows: int, *, exclude: np.ndarray | None = None, latest_only: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str] | None]]:
    """Yield ``(ids int64, vectors float32 C-contiguous, string ids or None)`` of at most ``batch_rows``.

    Shards are read a batch at a time (never memory-mapped), so peak memory is one batch,
    whatever the shard sizes. Rows whose id is in ``exclude`` (sorted int64) are dropped, and with
    ``latest_only`` so are rows that a later shard replaces.
    """
    shards = list(shards)
    excludes = shard_excludes(shards, exclude, latest_only=latest_only)
    for _, _, ids, vectors, strings in located_batches(shards, batch_rows, excludes):
        yield ids, vectors, strings


def live_locations(shards: list[Shard], excludes: list[np.ndarray], *, first_number: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, shard numbers, rows)`` of every indexed row, sorted by id; reads ids files only."""
    all_ids, all_shard, all_rows = [], [], []
    for number, (shard, exclude) in enumerate(zip(shards, excludes, strict=True), start=first_number):
        ids, _ = ids_to_int64(_load_ids_file(shard.ids), path=shard.ids)
        rows = np.arange(len(ids), dtype=np.int64)
        if exclude.size:
            keep = ~np.isin(ids, exclude)
            ids, rows = ids[keep], rows[keep]
        all_ids.append(ids)
        all_rows.append(rows)
        all_shard.append(np.full(len(ids), number, dtype=np.int32))
    ids = np.concatenate(all_ids) if all_ids else np.empty(0, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    shard_no = np.concatenate(all_shard)[order] if all_shard else np.empty(0, dtype=np.int32)
    rows = np.concatenate(all_rows)[order] if all_rows else np.empty(0, dtype=np.int64)
    return ids[order], shard_no, rows


def sample_rows(shards: list[Shard], n: int, seed: int, *, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random sample of ``n`` rows (ids, float32 vectors) without loading whole shards."""
    total = sum(s.rows for s in shards)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
    # Filled in place, shard by shard, with the picked rows read: one copy of the sample, never a shard.
    out_ids = np.empty(len(picks), dtype=np.int64)
    out_vec = np.empty((len(picks), shards[0].dim if shards else 0), dtype=np.float32)
    offset = filled = 0
    for shard in shards:
        local = picks[(picks >= offset) & (picks < offset + shard.rows)] - offset
        offset += shard.rows
        if not local.size:
            continue
        ids, _ = ids_to_int64(_load_ids_file(shard.ids), path=shard.ids)
        out_ids[filled:filled + local.size] = ids[local]
        with NpyRows(shard.vectors) as vectors:
            out_vec[filled:filled + local.size] = vectors.take(local)
        filled += local.size
    all_ids, all_vec = out_ids, out_vec
    if exclude is not None and exclude.size:
        keep = ~np.isin(all_ids, exclude)
        if not keep.all():
            all_ids, all_vec = all_ids[keep], np.ascontiguousarray(all_vec[keep])
    return all_ids, all_vec
