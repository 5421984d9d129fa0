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
    "IndexConfig": "airflow_outpost.runners.index.build",
    "IndexStateError": "airflow_outpost.runners.index.build",
    "build_index": "airflow_outpost.runners.index.build",
    "update_index": "airflow_outpost.runners.index.build",
    "promote": "airflow_outpost.runners.index.build",
    "rollback": "airflow_outpost.runners.index.build",
    "current_version": "airflow_outpost.runners.index.build",
    "list_versions": "airflow_outpost.runners.index.build",
    "IndexSearcher": "airflow_outpost.runners.index.search",
    "BatchConfig": "airflow_outpost.runners.batch.inference",
    "run_batch_inference": "airflow_outpost.runners.batch.inference",
    "run_plain_loop": "airflow_outpost.runners.batch.inference",
    "list_partitions": "airflow_outpost.runners.batch.inference",
    "RayConfig": "airflow_outpost.runners.batch.ray_session",
    "RayAuthError": "airflow_outpost.runners.batch.ray_session",
    "RayConnectError": "airflow_outpost.runners.batch.ray_session",
    "ray_session": "airflow_outpost.runners.batch.ray_session",
    "PrototypeClassifier": "airflow_outpost.runners.batch.example_models",
    "Store": "airflow_outpost.runners.store.region_store",
    "hash_bytes": "airflow_outpost.runners.store.region_store",
    "hash_text": "airflow_outpost.runners.store.region_store",
    "hash_file": "airflow_outpost.runners.store.region_store",
    "hash_tree": "airflow_outpost.runners.store.region_store",
    "input_record": "airflow_outpost.runners.store.region_store",
    "model_record": "airflow_outpost.runners.store.region_store",
    "code_version": "airflow_outpost.runners.store.region_store",
    "Embedder": "airflow_outpost.runners.embeddings.embedder",
    "packaged_model_path": "airflow_outpost.runners.embeddings.embedder",
    "ChunkingConfig": "airflow_outpost.runners.embeddings.chunking",
    "chunk_text": "airflow_outpost.runners.embeddings.chunking",
    "read_documents": "airflow_outpost.runners.embeddings.documents",
    "embed_corpus": "airflow_outpost.runners.embeddings.corpus",
    "read_catalog": "airflow_outpost.runners.embeddings.corpus",
    "read_vectors": "airflow_outpost.runners.embeddings.corpus",
    "chunk_key": "airflow_outpost.runners.embeddings.corpus",
    "RunnerError": "airflow_outpost.runners.errors",
    "ModelClient": "airflow_outpost.runners.model_service.client",
    "ServiceEmbedder": "airflow_outpost.runners.model_service.client",
    "make_embedder": "airflow_outpost.runners.model_service.client",
    "ModelService": "airflow_outpost.runners.model_service.service",
    "ModelServiceError": "airflow_outpost.runners.model_service.protocol",
    "GpuMemoryError": "airflow_outpost.runners.model_service.protocol",
    "QueryRetriever": "airflow_outpost.runners.batch.retrieval",
    "emit": "airflow_outpost.runners.assets",
}

__all__: list[str] = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runners' has no attribute {name!r}")
