"""Query retrieval as a batch-inference model: embed query texts, search a promoted FAISS index.

``QueryRetriever`` follows the ``airflow_outpost.runners.batch.example_models`` shape (expensive setup in ``__init__``, a pure
``__call__(batch) -> batch``), so ``run_batch_inference`` can run it in Ray actors and
``run_plain_loop`` in-process. With ``encoder="service"`` (or ``"auto"`` on a worker) the query
vectors come from the worker's warm model service, so an actor loads no model at all.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.errors import InputError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["QueryRetriever"]


class QueryRetriever:
    """Nearest documents for each query row.

    ``index_dir``: an index directory with a promoted version (pinned at construction).
    ``model_path``: the embedding model the index was built with (None: the packaged model).
    ``__call__`` returns ``id`` (passed through when present), ``top_id``, ``top_score`` and
    ``neighbors`` (the ``k`` nearest ids, space-separated). Deterministic for a given index
    version, so retries write the same output.
    """

    def __init__(self, index_dir: str | os.PathLike[str], *, model_path: str | os.PathLike[str] | None = None,
                 k: int = 5, encoder: str = "auto", device: str = "cpu", backend: str = "auto",
                 text_column: str = "text", id_column: str = "id") -> None:
        from airflow_outpost.runners.index.search import IndexSearcher
        from airflow_outpost.runners.model_service.client import make_embedder

        self.searcher = IndexSearcher(index_dir, k=k)
        self.embedder = make_embedder(model_path, encoder=encoder, device=device, backend=backend)
        self.text_column, self.id_column, self.k = text_column, id_column, k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        if self.text_column not in batch:
            raise InputError(f"batch has no {self.text_column!r} column (columns: {sorted(batch)})")
        vectors = self.embedder.embed([str(t) for t in batch[self.text_column]])
        found = self.searcher({self.searcher.vector_column: vectors})
        scores = np.asarray(found["neighbor_scores"])
        # FAISS pads missing neighbours with id -1 (int ids) or "" (string ids).
        names = [[str(i) for i in row if str(i) not in ("", "-1")] for row in np.asarray(found["neighbor_ids"]).tolist()]
        out: dict[str, Any] = {}
        if self.id_column in batch:
            out[self.id_column] = np.asarray(batch[self.id_column])
        out["top_id"] = np.array([row[0] if row else "" for row in names], dtype=object).astype(str)
        out["top_score"] = scores[:, 0].astype(np.float32)
        out["neighbors"] = np.array([" ".join(row) for row in names], dtype=object).astype(str)
        return out
