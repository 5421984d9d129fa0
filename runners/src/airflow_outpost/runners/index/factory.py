"""Making, training and tuning the FAISS index of each kind (see ``.config``), on CPU or GPU."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.errors import BackendUnavailableError
from airflow_outpost.runners.index.config import COMPRESSED_KINDS, IVF_KINDS, IndexConfig, nlist_for, pq_params, train_rows

if TYPE_CHECKING:
    import faiss
    import numpy as np

__all__ = ["faiss_metric", "new_index", "set_search_params", "train", "use_gpu"]

log = logging.getLogger(__name__)


def faiss_metric(metric: str) -> int:
    import faiss

    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]


def use_gpu(config: IndexConfig) -> bool:
    """True when FAISS has GPUs (``faiss.get_num_gpus() > 0``) and ``config.device`` allows them."""
    import faiss

    available = faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_gpu")
    if config.device == "gpu" and not available:
        raise BackendUnavailableError("IndexConfig.device='gpu' but no GPU build of FAISS or no GPU is present")
    return available and config.device != "cpu"


def new_index(kind: str, dim: int, n: int, config: IndexConfig) -> tuple[faiss.Index, dict[str, Any]]:
    """An empty (untrained) index of ``kind`` and the parameters chosen for it from ``n`` rows."""
    import faiss

    metric = faiss_metric(config.metric)
    if kind == "flat":
        return faiss.index_factory(dim, "IDMap2,Flat", metric), {}
    if kind in IVF_KINDS:
        nlist = nlist_for(config, kind, n)
        params: dict[str, Any] = {"nlist": nlist, "nprobe": config.nprobe, "train_rows": train_rows(config, kind, nlist, n)}
        if kind == "ivf":
            spec = f"IVF{nlist},Flat"
        elif kind == "ivfsq8":
            spec = f"IVF{nlist},SQ8"
        else:
            m, nbits = pq_params(config, dim, params["train_rows"])
            params.update(m=m, nbits=nbits)
            spec = f"IVF{nlist},PQ{m}x{nbits}" if kind == "ivfpq" else f"OPQ{m},IVF{nlist},PQ{m}x{nbits}"
        params["factory"] = spec
        return faiss.index_factory(dim, spec, metric), params
    index = faiss.index_factory(dim, f"IDMap2,HNSW{config.hnsw_m},Flat", metric)
    # IDMap2 -> the HNSW index inside it; faiss's SWIG stubs type every downcast as the base Index.
    idmap: Any = faiss.downcast_index(index)
    inner: Any = faiss.downcast_index(idmap.index)
    inner.hnsw.efConstruction = config.hnsw_ef_construction
    return index, {"M": config.hnsw_m, "ef_construction": config.hnsw_ef_construction, "ef_search": config.hnsw_ef_search}


def to_device(index: faiss.Index, kind: str, gpu: bool) -> tuple[faiss.Index, bool]:
    """``index`` on GPU 0 when ``gpu`` and FAISS can clone that kind there; else unchanged (logged)."""
    import faiss

    if not gpu or kind == "hnsw":
        return index, False
    try:
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = kind in COMPRESSED_KINDS  # large PQ sub-quantizer counts need fp16 lookup tables
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, opts), True
    except RuntimeError as exc:  # FAISS raises RuntimeError for a kind or size its GPU code lacks
        log.warning("index kind %s cannot run on the GPU (%s); building on CPU", kind, exc)
        return index, False


def train(index: faiss.Index, kind: str, sample: np.ndarray, gpu: bool) -> faiss.Index:
    """Train ``index`` (CPU) on ``sample``, on the GPU when ``gpu``; return the trained CPU index."""
    import faiss

    if kind not in IVF_KINDS:
        return index
    work, on_gpu = to_device(index, kind, gpu)
    log.info("training %s on %d sampled vectors%s", kind, len(sample), " on GPU" if on_gpu else "")
    work.train(sample)
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def set_search_params(index: faiss.Index, kind: str, params: dict[str, Any]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    if kind in IVF_KINDS:
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))
