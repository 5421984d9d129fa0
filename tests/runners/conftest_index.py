"""Helpers for the index tests: clustered vectors with low-dimensional structure, written as shards.

Random Gaussian vectors make every neighbour equally far and recall meaningless; these vectors
live near a low-dimensional latent space (mixture of clusters), like real text embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def structured_vectors(n: int, dim: int = 64, *, clusters: int = 50, latent: int = 16, seed: int = 0,
                       spread: float = 0.35) -> np.ndarray:
    """``n x dim`` float32 unit vectors drawn from ``clusters`` Gaussian blobs in a ``latent``-dim subspace."""
    rng = np.random.default_rng(seed)
    # The projection and centres depend only on the structure, not on n, so batches share a space.
    srng = np.random.default_rng(12345 + latent * 7 + clusters)
    proj = srng.standard_normal((latent, dim)).astype(np.float32)
    centres = srng.standard_normal((clusters, latent)).astype(np.float32) * 2.0
    z = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, latent)).astype(np.float32)
    x = z @ proj + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def write_shard(directory: Path, stem: str, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Write ``<stem>.npy`` and ``<stem>.ids.npy`` the way the embeddings runner lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{stem}.npy", vectors)
    np.save(directory / f"{stem}.ids.npy", ids)


def write_deleted(directory: Path, ids) -> None:
    (directory / "deleted_ids.json").write_text(json.dumps([int(i) if not isinstance(i, str) else i for i in ids]))


def make_embeddings(directory: Path, n: int, dim: int = 64, *, shards: int = 4, seed: int = 0,
                    dtype=np.float32, id_offset: int = 0, **kw) -> np.ndarray:
    """Write ``n`` structured vectors as ``shards`` shards with ids ``id_offset..``; return the vectors."""
    x = structured_vectors(n, dim, seed=seed, **kw)
    ids = np.arange(id_offset, id_offset + n, dtype=np.int64)
    for i, part in enumerate(np.array_split(np.arange(n), shards)):
        write_shard(directory, f"shard-{seed:03d}-{i:05d}", x[part].astype(dtype), ids[part])
    return x
