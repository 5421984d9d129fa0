"""Compute that DAG tasks call on an outpost worker: embeddings, FAISS indexes, Ray batch inference.

Nothing here imports ``airflow_outpost.worker`` (this distribution, ``airflow-outpost-runners``, installs
alone on Ray nodes); the worker hands task processes their configuration through
the environment (``OUTPOST_STORE_ROOT``, ``OUTPOST_REGION``, ...).

The names below are the DAG-author API. Importing this package is cheap: FAISS, torch, Ray,
sentence-transformers, pyarrow, ONNX Runtime, CTranslate2 and numpy are imported by the calls
that use them, not here, so a DAG file can import it at parse time. Every runner returns a plain
dict for XCom, typed by a ``TypedDict`` of :mod:`.results`; every error is a ``RunnerError``
(hierarchy in :mod:`.errors`). Lower-level helpers (lineage hashes, the model service process,
chunk keys) stay in their submodules.
"""

from __future__ import annotations

from airflow_outpost.runners.assets import emit
from airflow_outpost.runners.batch.example_models import PrototypeClassifier
from airflow_outpost.runners.batch.inference import BatchConfig, list_partitions, run_batch_inference, run_plain_loop
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session
from airflow_outpost.runners.batch.retrieval import QueryRetriever
from airflow_outpost.runners.embeddings.chunking import ChunkingConfig, chunk_text
from airflow_outpost.runners.embeddings.corpus import embed_corpus, read_catalog, read_vectors
from airflow_outpost.runners.embeddings.documents import read_documents
from airflow_outpost.runners.embeddings.embedder import Embedder, packaged_model_path
from airflow_outpost.runners.errors import (
    BackendUnavailableError,
    ComputeLostError,
    DimensionMismatchError,
    DuplicateIdError,
    EmptyCorpusError,
    EncodingError,
    GpuMemoryError,
    IndexStateError,
    InputError,
    LeaseLostError,
    ManifestError,
    MissingFieldError,
    ModelError,
    ModelNotFoundError,
    ModelServiceError,
    QualityGateError,
    RayAuthError,
    RayConnectError,
    RunnerError,
    SettingError,
    StoreBusyError,
    StoreError,
)
from airflow_outpost.runners.index.build import IndexConfig, build_index, update_index
from airflow_outpost.runners.index.search import IndexSearcher
from airflow_outpost.runners.index.versions import current_version, list_versions, promote, rollback
from airflow_outpost.runners.model_service.client import ModelClient, ServiceEmbedder, make_embedder
from airflow_outpost.runners.results import (
    AssetExtra,
    BackendInfo,
    BatchSummary,
    EmbedSummary,
    IndexSummary,
    ModelLineage,
    PromoteResult,
    RaySessionInfo,
    RollbackResult,
    WarmActorsSummary,
)
from airflow_outpost.runners.store import region_store as _region_store
from airflow_outpost.runners.store.region_store import Store

__version__: str = _region_store.code_version()
del _region_store

__all__ = [
    "__version__",
    # store
    "Store",
    # embeddings
    "ChunkingConfig",
    "Embedder",
    "chunk_text",
    "embed_corpus",
    "packaged_model_path",
    "read_catalog",
    "read_documents",
    "read_vectors",
    # the worker's model service, from a task
    "ModelClient",
    "ServiceEmbedder",
    "make_embedder",
    # indexes
    "IndexConfig",
    "IndexSearcher",
    "build_index",
    "current_version",
    "list_versions",
    "promote",
    "rollback",
    "update_index",
    # batch inference
    "BatchConfig",
    "PrototypeClassifier",
    "QueryRetriever",
    "RayConfig",
    "list_partitions",
    "ray_session",
    "run_batch_inference",
    "run_plain_loop",
    # Airflow assets
    "emit",
    # results (TypedDicts of the summary dicts)
    "AssetExtra",
    "BackendInfo",
    "BatchSummary",
    "EmbedSummary",
    "IndexSummary",
    "ModelLineage",
    "PromoteResult",
    "RaySessionInfo",
    "RollbackResult",
    "WarmActorsSummary",
    # errors
    "BackendUnavailableError",
    "ComputeLostError",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EmptyCorpusError",
    "EncodingError",
    "GpuMemoryError",
    "IndexStateError",
    "InputError",
    "LeaseLostError",
    "ManifestError",
    "MissingFieldError",
    "ModelError",
    "ModelNotFoundError",
    "ModelServiceError",
    "QualityGateError",
    "RayAuthError",
    "RayConnectError",
    "RunnerError",
    "SettingError",
    "StoreBusyError",
    "StoreError",
]
