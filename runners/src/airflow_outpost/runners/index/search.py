"""Searching a promoted FAISS index version: a stateful callable for tasks and Ray ``map_batches``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_outpost.runners.errors import DimensionMismatchError
from airflow_outpost.runners.index.factory import set_search_params
from airflow_outpost.runners.index.versions import IndexStateError, current_version, load_index, read_version_manifest, version_dir

if TYPE_CHECKING:
    import numpy as np

__all__ = ["IndexSearcher"]


class IndexSearcher:
    """Stateful searcher over one index version (``current`` by default), loaded once in ``__init__``.

    ``search(queries, k)`` returns ``(scores, ids)``; ``__call__(batch)`` takes a dict batch
    with a ``vector_column`` and returns a new dict with ``neighbor_ids`` (document ids, strings
    when the shards used strings) and ``neighbor_scores`` added. Pure and thread-safe for reads,
    so the same object serves in-process calls and Ray ``map_batches``. The version is pinned:
    a later promotion does not change what an existing searcher returns.

    A version built with a rerank (the compressed kinds by default) asks the index for
    ``rerank_factor * k`` candidates (default: the build's) and returns the ``k`` best by exact
    distance against the float shards (the candidates' rows read, not mapped); ``rerank=False`` skips that. On-disk
    inverted lists are memory-mapped read-only.
    """

    def __init__(
        self, index_dir: str | os.PathLike[str], *, version: str | None = None, k: int = 10,
        nprobe: int | None = None, ef_search: int | None = None, vector_column: str = "vector",
        rerank: bool = True, rerank_factor: int | None = None,
    ) -> None:
        from airflow_outpost.runners.index.rerank import Reranker

        self.index_dir = Path(index_dir)
        self.version = version or current_version(self.index_dir)
        if self.version is None:
            raise IndexStateError(f"{self.index_dir}: no promoted index version")
        vdir = version_dir(self.index_dir, self.version)
        self.manifest = read_version_manifest(self.index_dir, self.version)
        # Checked against the manifest's index_sha256 (ManifestError on a mismatch).
        self.index = load_index(self.index_dir, self.version, self.manifest, read_only=True)
        params = dict(self.manifest["params"])
        params.update({k_: v for k_, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None})
        set_search_params(self.index, self.manifest["kind"], params)
        self.k, self.vector_column = k, vector_column
        built = self.manifest.get("rerank") or {}
        self.reranker = Reranker.open(vdir, self.manifest) if rerank and built.get("enabled") else None
        self.rerank_factor = rerank_factor or int(built.get("factor", 10))
        from airflow_outpost.runners.index.id_strings import IdStrings

        self._strings = IdStrings.load(vdir)

    def search(self, queries: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` (default: the searcher's) nearest vectors of each query row."""
        import numpy as np

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.index.d:
            raise DimensionMismatchError(f"queries have dimension {q.shape[1]}, index {self.version} has {self.index.d}")
        if self.reranker is not None:
            from airflow_outpost.runners.index.rerank import search_reranked

            return search_reranked(self.index, self.reranker, q, k or self.k, self.rerank_factor)
        return self.index.search(q, k or self.k)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        scores, ids = self.search(np.stack(list(batch[self.vector_column])))
        out = dict(batch)
        if self._strings:
            out["neighbor_ids"] = np.array(self._strings.lookup(ids), dtype=object).reshape(ids.shape)
        else:
            out["neighbor_ids"] = ids
        out["neighbor_scores"] = scores
        return out
