"""Example model classes for batch inference: bring-your-own callables follow the same shape.

A model class takes everything expensive in ``__init__`` (weights, label prototypes) and is a
pure ``__call__(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]`` returning as many
rows as it got. ``airflow_outpost.runners.batch.inference`` constructs it once per Ray actor (or once in-process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from airflow_outpost.runners.errors import InputError, ModelNotFoundError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PrototypeClassifier"]


class PrototypeClassifier:
    """Zero-shot text classifier: cosine similarity of sentence embeddings to label prototypes.

    ``labels`` maps each label to one or more example phrases; a label's prototype is the
    normalised mean of their embeddings. ``model_path`` is a local sentence-transformers
    directory (nothing is downloaded: ``HF_HUB_OFFLINE`` is forced on). ``threads`` sets
    torch's intra-op threads (None leaves torch's default, which Ray sets from the actor's
    ``num_cpus``). ``__call__`` returns ``id`` (passed through), ``label`` and ``score``.
    Deterministic for a given batch, so retries produce the same output.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        labels: Mapping[str, Sequence[str]],
        *,
        text_column: str = "text",
        id_column: str = "id",
        device: str = "cpu",
        batch_size: int = 64,
        threads: int | None = None,
    ) -> None:
        # Runners never reach the hub at run time; a missing local file must fail, not download.
        os.environ["HF_HUB_OFFLINE"] = "1"
        import numpy as np
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        if not os.path.isfile(os.path.join(model_path, "modules.json")):
            raise ModelNotFoundError(f"{model_path} is not a sentence-transformers model directory")
        if not labels:
            raise ValueError("PrototypeClassifier.labels is empty: give at least one label with example phrases")
        self.model = SentenceTransformer(str(model_path), device=device)
        self.text_column, self.id_column, self.batch_size = text_column, id_column, batch_size
        self.labels = np.array(list(labels), dtype=object)
        protos = []
        for phrases in labels.values():
            emb = self.model.encode(list(phrases), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
            mean = emb.mean(axis=0)
            protos.append(mean / np.linalg.norm(mean))
        self.prototypes = np.stack(protos).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        if self.text_column not in batch:
            raise InputError(f"batch has no {self.text_column!r} column (columns: {sorted(batch)})")
        texts = [str(t) for t in batch[self.text_column]]
        emb = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        sims = emb @ self.prototypes.T
        best = sims.argmax(axis=1)
        out: dict[str, np.ndarray] = {}
        if self.id_column in batch:
            out[self.id_column] = np.asarray(batch[self.id_column])
        out["label"] = self.labels[best].astype(str)
        out["score"] = sims[np.arange(len(best)), best].astype(np.float32)
        return out
