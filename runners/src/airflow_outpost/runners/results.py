"""What the runners return: the summary dicts that cross into XCom, typed for DAG authors.

Every runner returns a plain ``dict`` (so XCom and asset-event extras hold exactly what they held
before); these ``TypedDict`` classes only tell type checkers, and readers, which keys it has.
Keys marked ``NotRequired`` are present only in the case their comment names. Values are JSON
types only: counts, versions, recall, checksums, paths and ``file://`` URIs, never vectors or texts.

=========================  ==================================================================
runner                     returns
=========================  ==================================================================
``build_index``            ``IndexSummary``
``update_index``           ``IndexSummary``
``promote``                ``PromoteResult``
``rollback``               ``RollbackResult``
``embed_corpus``           ``EmbedSummary`` (with ``ModelLineage`` and ``BackendInfo`` inside)
``run_batch_inference``    ``BatchSummary`` (with ``WarmActorsSummary`` when actors are kept warm)
``run_plain_loop``         ``BatchSummary``
``ray_session``            yields ``RaySessionInfo``
``emit``                   ``AssetExtra``: a JSON copy of the summary it was given
=========================  ==================================================================
"""

# No ``from __future__ import annotations`` here: TypedDict must see ``NotRequired`` at class
# creation to list those keys in ``__optional_keys__`` (string annotations hide it on 3.11).
from typing import Any, NotRequired, TypeAlias, TypedDict

__all__ = [
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
]


class IndexSummary(TypedDict):
    """What ``build_index`` and ``update_index`` return: the new version and its recall gate."""

    version: str  # the version written by this call, "v000003"
    path: str  # its directory
    index_dir: str
    kind: str  # "flat", "ivf", "ivfpq", "opq", "ivfsq8" or "hnsw"
    count: int  # vectors in the new version
    dim: int
    recall: float | None  # recall@k on the held-out queries; None without evaluation queries
    k: int
    min_recall: float
    passed: bool  # recall reached min_recall
    promoted: bool  # the new version is now ``current``
    current: str | None  # the version ``current`` points at after the call
    previous: str | None  # the version ``current`` pointed at before the call
    mode: str  # "rebuild" (build_index, or update_index's fallback) or "incremental"
    seconds: float
    engine: str  # "local" or "ray" (where the vectors were added)
    rerank: bool  # searches rerank the index's candidates against the float shards
    recall_without_rerank: float | None  # recall@k of the index alone (equal to ``recall`` without rerank)
    on_disk: bool  # inverted lists in index.ivfdata, memory-mapped when searched
    index_bytes: int  # index files on disk (index.faiss + index.ivfdata)
    search_memory_bytes: int  # what a searcher holds in RAM for the index (on-disk lists and shards: page cache)


class PromoteResult(TypedDict):
    """What ``promote`` returns."""

    current: str  # the promoted version
    previous: str | None  # what ``current`` pointed at before (equal to ``current`` for a no-op)
    recall: float | None  # the recall recorded for the promoted version


class RollbackResult(TypedDict):
    """What ``rollback`` returns."""

    current: str  # the version ``current`` points at now
    rolled_back: str  # the version it pointed at before


class ModelLineage(TypedDict):
    """The model that produced vectors: a name, its revision if known, a hash of every weights file."""

    name: str
    revision: str | None
    weights_sha256: str


class BackendInfo(TypedDict):
    """How the vectors were computed (``Embedder.describe()`` without its ``model``)."""

    backend: str  # "torch", "ct2", "ct2-int8", "onnx" or "onnx-int8"
    device: str
    precision: str
    dim: int
    max_seq_length: int
    normalize: bool
    calibration_cosine: NotRequired[float]  # fast CPU backends: measured against the fp32 model
    fallback: NotRequired[str]  # why ``backend="auto"`` fell back from the int8 build
    encoder: NotRequired[str]  # "service" when the worker's model service computed the vectors


class EmbedSummary(TypedDict):
    """What ``embed_corpus`` returns."""

    name: str  # ``embeddings/<name>`` in the store
    changed: bool  # False: the corpus was unchanged and nothing was written
    version: int  # the live version of the embeddings after the call
    documents: int
    chunks: int
    embedded: int  # distinct chunk texts that went through the model in this call
    resumed: int  # chunk texts whose vectors an interrupted earlier run had committed (not embedded again)
    partitions: int  # input files of the corpus
    engine: str  # "local" or "ray"
    reused: int  # new or changed chunks whose vectors were already in the store
    added: int
    updated: int
    deleted: int
    deleted_documents: int
    dim: int
    dtype: str  # "float32" or "float16"
    model: ModelLineage
    backend: BackendInfo
    code_version: str
    manifest_uri: str
    catalog_sha256: str
    catalog_uri: NotRequired[str]  # when ``changed``
    changes_uri: NotRequired[str]  # when ``changed``
    shards_written: NotRequired[int]  # when ``changed``: shards of this version (new or resumed)


class WarmActorsSummary(TypedDict):
    """Warm-actor reuse of one ``run_batch_inference`` call with ``BatchConfig(keep_warm_s > 0)``."""

    reused: int  # actors found loaded from an earlier run
    started: int  # actors created by this run
    keep_warm_s: float


class BatchSummary(TypedDict):
    """What ``run_batch_inference`` and ``run_plain_loop`` return."""

    output_dir: str
    engine: str  # "ray" or "loop"
    partitions: int
    rows: int
    seconds: float
    rows_per_s: float | None
    manifest: str  # path of ``manifest.json`` in ``output_dir``
    actors: NotRequired[int]  # engine "ray"
    gpus_per_actor: NotRequired[float]  # engine "ray"
    ray_address: NotRequired[str | None]  # engine "ray"; None for a Ray started for the call
    warm_actors: NotRequired[WarmActorsSummary]  # engine "ray" with keep_warm_s > 0
    resumed_partitions: NotRequired[int]  # engine "ray" without warm actors: skipped, committed by an earlier try


class RaySessionInfo(TypedDict):
    """What ``ray_session()`` yields."""

    address: str | None  # the cluster joined; None for a local Ray (or one already initialised)
    started: bool  # this session started a local Ray (and stops it on exit)
    reused: bool  # Ray was already initialised in this process; left open on exit
    resources: dict[str, float]  # ``ray.cluster_resources()``


# ``emit`` returns a JSON copy of whatever summary it was given, so its keys are the caller's:
# one of the TypedDicts above for a runner's summary (their values survive the copy unchanged).
AssetExtra: TypeAlias = dict[str, Any]
