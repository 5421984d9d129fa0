"""Compute that DAG tasks call on an outpost worker: embeddings, FAISS indexes, Ray batch inference.

Nothing here imports ``worker``; the worker hands task processes their configuration through
the environment (``OUTPOST_STORE_ROOT``, ``OUTPOST_REGION``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names -> defining module. Imported on first use, so ``import runners`` stays cheap
# (FAISS, Ray and torch load only when a task uses them).
_LAZY = {
    "IndexConfig": "runners.index",
    "IndexStateError": "runners.index",
    "build_index": "runners.index",
    "update_index": "runners.index",
    "promote": "runners.index",
    "rollback": "runners.index",
    "current_version": "runners.index",
    "list_versions": "runners.index",
    "IndexSearcher": "runners.index_search",
    "BatchConfig": "runners.batch",
    "run_batch_inference": "runners.batch",
    "run_plain_loop": "runners.batch",
    "list_partitions": "runners.batch",
    "RayConfig": "runners.ray_session",
    "RayAuthError": "runners.ray_session",
    "RayConnectError": "runners.ray_session",
    "ray_session": "runners.ray_session",
    "PrototypeClassifier": "runners.models",
    "Store": "runners.store",
    "hash_bytes": "runners.store",
    "hash_text": "runners.store",
    "hash_file": "runners.store",
    "hash_tree": "runners.store",
    "input_record": "runners.store",
    "model_record": "runners.store",
    "code_version": "runners.store",
    "Embedder": "runners.embedder",
    "packaged_model_path": "runners.embedder",
    "ChunkingConfig": "runners.chunking",
    "chunk_text": "runners.chunking",
    "read_documents": "runners.corpus",
    "embed_corpus": "runners.embeddings",
    "read_catalog": "runners.embeddings",
    "read_vectors": "runners.embeddings",
    "chunk_key": "runners.embeddings",
    "RunnerError": "runners.errors",
    "ModelClient": "runners.model_client",
    "ServiceEmbedder": "runners.model_client",
    "make_embedder": "runners.model_client",
    "ModelService": "runners.model_service",
    "ModelServiceError": "runners._service_protocol",
    "GpuMemoryError": "runners._service_protocol",
    "QueryRetriever": "runners.retrieval",
    "emit": "runners.airflow",
}

__all__: list[str] = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runners' has no attribute {name!r}")
