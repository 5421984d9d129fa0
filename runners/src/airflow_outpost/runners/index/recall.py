"""Recall evaluation for index builds: exact top-k by streaming brute force, and recall@k.

Ground truth is computed over the same rows the index holds (deleted ids excluded), one batch
at a time, so memory stays at one batch plus the running top-k of every query.
"""

from __future__ import annotations

import faiss
import numpy as np


def _merge_topk(
    best_d: np.ndarray, best_i: np.ndarray, d: np.ndarray, i: np.ndarray, k: int, larger_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    all_d = np.concatenate([best_d, d], axis=1)
    all_i = np.concatenate([best_i, i], axis=1)
    key = -all_d if larger_is_better else all_d
    # A stable sort with ids as the tiebreak keeps results deterministic across batch splits.
    order = np.lexsort((all_i, key), axis=1)[:, :k]
    return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)


class ExactTopK:
    """Running exact top-k of fixed queries; feed it batches of ``(ids, vectors)`` with ``add``.

    ``metric`` is a ``faiss.METRIC_*``. ``ids``/``scores`` (``len(queries) x k``) are -1/inf
    padded until k rows have been seen.
    """

    def __init__(self, queries: np.ndarray, k: int, metric: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.metric = metric
        self.larger_is_better = metric == faiss.METRIC_INNER_PRODUCT
        fill = -np.inf if self.larger_is_better else np.inf
        self.scores = np.full((len(queries), k), fill, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids) or not len(self.queries):
            return
        d, local = faiss.knn(self.queries, vectors, min(self.k, len(ids)), metric=self.metric)
        self.merge(ids[local], d)

    def merge(self, ids: np.ndarray, scores: np.ndarray) -> None:
        self.scores, self.ids = _merge_topk(self.scores, self.ids, scores, ids, self.k, self.larger_is_better)

    def without(self, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Copy of (ids, scores) with ``removed`` ids dropped (re-padded); plus the fewest valid per row."""
        ids, scores = self.ids.copy(), self.scores.copy()
        gone = np.isin(ids, removed) | (ids < 0)
        fill = -np.inf if self.larger_is_better else np.inf
        ids[gone], scores[gone] = -1, fill
        order = np.argsort(gone, axis=1, kind="stable")
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        valid = int((~gone).sum(axis=1).min()) if len(ids) else self.k
        return ids, scores, valid


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k ids that ``found`` (same shape) contains."""
    hits = 0
    total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        total += len(t)
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=False))
    return hits / total if total else 1.0
