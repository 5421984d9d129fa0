"""``IndexConfig`` and the index kinds it chooses between, with the parameters picked from the data.

Kinds (``IndexConfig.kind``):

* ``flat``: exact search over the raw float32 vectors (4*dim bytes per vector).
* ``ivf``: IVF-Flat, an inverted file over the raw vectors; as large as ``flat``, searched in part.
* ``ivfpq``: IVF-PQ, each vector stored as ``pq_m`` codes of ``pq_nbits`` bits (48 bytes for
  384-d by default: 1/32 of the float32 vector); approximate distances, so reranked by default.
* ``opq``: IVF-PQ after a learned rotation (OPQ), which spreads variance over the sub-vectors.
* ``ivfsq8``: IVF with one byte per dimension (1/4 of float32); near-exact distances.
* ``hnsw``: a graph over the raw vectors; fast, the largest, cannot remove vectors or merge.

The compressed kinds (``ivfpq``, ``opq``, ``ivfsq8``) rerank by default: the index proposes
``rerank_factor * k`` candidates and their exact distances are computed from the float shards
of the embeddings directory, memory-mapped, so memory at search time is the index plus the
candidates' pages. Nothing here imports FAISS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["COMPRESSED_KINDS", "IVF_KINDS", "IndexConfig", "choose_kind", "nlist_for", "pq_params", "train_rows"]

KINDS = ("auto", "flat", "ivf", "ivfpq", "opq", "ivfsq8", "hnsw")
IVF_KINDS = ("ivf", "ivfpq", "opq", "ivfsq8")
COMPRESSED_KINDS = ("ivfpq", "opq", "ivfsq8")
_METRICS = ("ip", "l2")


@dataclass(frozen=True)
class IndexConfig:
    """How to build and gate an index. Invalid values raise ValueError naming the field.

    ``kind="auto"`` picks Flat up to ``flat_max_vectors`` rows and IVF above (see the module
    docstring for the kinds). ``nlist=None`` sizes IVF at about 4*sqrt(n) lists (sqrt(n) for the
    compressed kinds, whose training sample must stay small). ``pq_m``/``pq_nbits`` (None: dim/8
    sub-quantizers of 8 bits, fewer bits on small data). ``rerank=None`` reranks the compressed
    kinds' top ``rerank_factor * k`` candidates against the float shards; True/False forces it.
    ``on_disk`` keeps the inverted lists in ``index.ivfdata`` next to the index, built in parts
    of ``group_rows`` rows merged as in FAISS's ``demo_ondisk_ivf.py``, and searched
    memory-mapped: memory is bounded by the part being added, not by the data.
    ``shard_groups`` (``engine="ray"``): how many add tasks (None: one per CPU of the cluster,
    at most one per shard). ``min_recall`` is the promotion gate for recall@``eval_k``
    measured on ``eval_queries`` held-out queries. ``threads=None`` leaves FAISS's default.
    """

    kind: str = "auto"
    metric: str = "ip"
    flat_max_vectors: int = 50_000
    nlist: int | None = None
    nprobe: int = 16
    train_sample: int | None = None
    pq_m: int | None = None
    pq_nbits: int | None = None
    rerank: bool | None = None
    rerank_factor: int = 10
    on_disk: bool = False
    group_rows: int = 1_000_000
    shard_groups: int | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    add_batch_rows: int = 65_536
    eval_queries: int = 200
    eval_k: int = 10
    min_recall: float = 0.9
    device: str = "auto"
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("kind", self.kind in KINDS, f"one of {KINDS}"),
            ("metric", self.metric in _METRICS, f"one of {_METRICS}"),
            ("device", self.device in ("auto", "cpu", "gpu"), "'auto', 'cpu' or 'gpu'"),
            ("min_recall", 0.0 <= self.min_recall <= 1.0, "in [0, 1]"),
            ("nlist", self.nlist is None or self.nlist >= 1, ">= 1 or None"),
            ("pq_m", self.pq_m is None or self.pq_m >= 1, ">= 1 or None"),
            ("pq_nbits", self.pq_nbits is None or 1 <= self.pq_nbits <= 16, "in [1, 16] or None"),
            ("shard_groups", self.shard_groups is None or self.shard_groups >= 1, ">= 1 or None"),
            ("on_disk", not self.on_disk or self.kind in (*IVF_KINDS, "auto"),
             f"only for the IVF kinds {IVF_KINDS} (kind={self.kind!r})"),
        ]
        for name in ("nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "add_batch_rows", "eval_k",
                     "rerank_factor", "group_rows"):
            checks.append((name, getattr(self, name) >= 1, ">= 1"))
        checks.append(("eval_queries", self.eval_queries >= 0, ">= 0"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"IndexConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def reranks(self, kind: str) -> bool:
        """Whether a ``kind`` index built with this config reranks against the float shards."""
        return (kind in COMPRESSED_KINDS) if self.rerank is None else self.rerank and kind != "flat"


def choose_kind(config: IndexConfig, n: int) -> str:
    if config.kind != "auto":
        return config.kind
    return "flat" if n <= config.flat_max_vectors and not config.on_disk else "ivf"


def nlist_for(config: IndexConfig, kind: str, n: int) -> int:
    if config.nlist is not None:
        return min(config.nlist, max(1, n))
    # Compressed kinds keep fewer lists so the training sample (40+ points per list) stays small.
    per = 1.0 if kind in COMPRESSED_KINDS else 4.0
    target = 2 ** round(math.log2(max(1.0, per * math.sqrt(n))))
    # FAISS wants >= 39 training points per list; stay within that for small sets.
    return int(max(1, min(target, 65_536, n // 40)))


def train_rows(config: IndexConfig, kind: str, nlist: int, n: int) -> int:
    """Rows sampled to train: enough for the coarse quantizer and the PQ/SQ codebooks, no more."""
    if config.train_sample:
        return min(n, config.train_sample)
    if kind in COMPRESSED_KINDS:
        return min(n, max(50 * nlist, 65_536))
    return min(n, max(64 * nlist, 20_000))


def pq_params(config: IndexConfig, dim: int, n_train: int) -> tuple[int, int]:
    """``(m, nbits)``: ``pq_m`` sub-quantizers (a divisor of ``dim``, default about dim/8) of ``pq_nbits``."""
    if config.pq_m is not None:
        if dim % config.pq_m:
            raise ValueError(f"IndexConfig.pq_m={config.pq_m} is invalid: must divide the dimension {dim}")
        m = config.pq_m
    else:
        m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    # Each codebook has 2**nbits centroids and wants ~39 training points per centroid.
    nbits = config.pq_nbits or int(max(4, min(8, math.floor(math.log2(max(16, n_train) / 39)))))
    return m, nbits
