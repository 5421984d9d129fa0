"""Reranking a compressed index's candidates with exact distances from the float shards.

A version that reranks keeps a map from every indexed id to its row: ``rerank_ids.npy``
(sorted int64), ``rerank_shard.npy`` (the shard's position in the version manifest's
``inputs``) and ``rerank_row.npy``. At search time the map is memory-mapped and the candidates'
rows are read from the shards with ``pread`` (npy_rows), never mapped: the searcher's memory is
the index and the map, not the pages of every row a query ever looked at.
The shards must still be where the manifest says, with the size and mtime it records
(``ManifestError`` otherwise: the vectors would belong to another version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from airflow_outpost.runners.errors import ManifestError
from airflow_outpost.runners.index.npy_rows import NpyRows

__all__ = ["RERANK_FILES", "Reranker", "save_locations"]

RERANK_FILES = ("rerank_ids.npy", "rerank_shard.npy", "rerank_row.npy")
_QUERY_CHUNK = 256


def save_locations(directory: Path, ids: np.ndarray, shard_no: np.ndarray, rows: np.ndarray) -> None:
    """Write the id -> (shard, row) map, sorted by id."""
    order = np.argsort(ids, kind="stable")
    for name, arr in zip(RERANK_FILES, (ids[order], shard_no[order], rows[order]), strict=True):
        np.save(directory / name, arr)


def load_locations(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The map in memory (for an update that edits it)."""
    ids, shard_no, rows = (np.load(directory / name) for name in RERANK_FILES)
    return ids, shard_no, rows


class Reranker:
    """Exact scores for candidate ids, read from the float shards of one index version.

    Keeps one open descriptor per shard it has read from; ``close()`` releases them.
    """

    def __init__(self, ids: np.ndarray, shard_no: np.ndarray, rows: np.ndarray, paths: list[Path], *,
                 inner_product: bool) -> None:
        self.ids, self.shard_no, self.rows, self.paths = ids, shard_no, rows, paths
        self.inner_product = inner_product
        self._files: dict[int, NpyRows] = {}

    @classmethod
    def open(cls, vdir: Path, manifest: dict[str, Any]) -> Reranker:
        """The map of version directory ``vdir``, memory-mapped; checks the shards' size and mtime."""
        ids, shard_no, rows = (np.load(vdir / name, mmap_mode="r") for name in RERANK_FILES)
        paths = [Path(i["path"]) for i in manifest["inputs"]]
        for path, record in zip(paths, manifest["shards"], strict=True):
            try:
                st = path.stat()
            except OSError as exc:
                raise ManifestError(f"{path}: the float shard this index reranks against is unreadable: {exc}") from exc
            if (st.st_size, st.st_mtime_ns) != (record["size"], record["mtime_ns"]):
                raise ManifestError(f"{path}: the float shard changed since the index was built (size/mtime differ)")
        return cls(ids, shard_no, rows, paths, inner_product=manifest.get("metric", "ip") == "ip")

    def _shard(self, number: int) -> NpyRows:
        if number not in self._files:
            self._files[number] = NpyRows(self.paths[number])
        return self._files[number]

    def close(self) -> None:
        for rows in self._files.values():
            rows.close()
        self._files.clear()

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the best ``k`` of each row's ``candidates`` by exact distance (-1 padded)."""
        out_s = np.empty((len(queries), k), dtype=np.float32)
        out_i = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), _QUERY_CHUNK):
            stop = start + _QUERY_CHUNK
            out_s[start:stop], out_i[start:stop] = self._rerank_chunk(queries[start:stop], candidates[start:stop], k)
        return out_s, out_i

    def _rerank_chunk(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq, nc = cand.shape
        flat = cand.ravel()
        vectors = np.zeros((flat.size, q.shape[1]), dtype=np.float32)
        pos = np.searchsorted(self.ids, flat).clip(0, max(0, len(self.ids) - 1))
        valid = (flat >= 0) & (len(self.ids) > 0)
        valid &= np.asarray(self.ids[pos]) == flat if len(self.ids) else valid
        where = np.flatnonzero(valid)
        shard_no, rows = np.asarray(self.shard_no[pos[where]]), np.asarray(self.rows[pos[where]])
        for number in np.unique(shard_no).tolist():
            sel = shard_no == number
            vectors[where[sel]] = self._shard(number).take(rows[sel])
        stacked = vectors.reshape(nq, nc, -1)
        if self.inner_product:
            scores = np.einsum("qcd,qd->qc", stacked, q)
            scores[~valid.reshape(nq, nc)] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        else:
            scores = ((stacked - q[:, None, :]) ** 2).sum(axis=2)
            scores[~valid.reshape(nq, nc)] = np.inf
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(scores, order, 1).astype(np.float32)
        best_i = np.take_along_axis(np.where(valid.reshape(nq, nc), cand, -1), order, 1)
        if order.shape[1] < k:  # fewer candidates than k: pad like FAISS
            pad = k - order.shape[1]
            fill = -np.inf if self.inner_product else np.inf
            best_s = np.hstack([best_s, np.full((nq, pad), fill, dtype=np.float32)])
            best_i = np.hstack([best_i, np.full((nq, pad), -1, dtype=np.int64)])
        return best_s, best_i


def search_reranked(index: Any, reranker: Reranker, queries: np.ndarray, k: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Ask ``index`` for ``factor * k`` candidates, return the best ``k`` by exact distance."""
    _, candidates = index.search(queries, max(k, factor * k))
    return reranker.rerank(queries, candidates, k)
