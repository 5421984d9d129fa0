"""Shared fixtures for the runner tests: the packaged model and loaded embedders.

Models load once per session; the CTranslate2 and ONNX int8 builds are cached in pytest's cache directory, so
only the first run on a machine pays for the export and calibration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

@pytest.fixture(scope="session")
def model_path() -> Path:
    from airflow_outpost.runners.embeddings.embedder import packaged_model_path

    return packaged_model_path()


@pytest.fixture(scope="session")
def torch_embedder(model_path):
    """fp32 sentence-transformers backend on CPU: the quality reference and the fast-to-load one."""
    from airflow_outpost.runners.embeddings.embedder import Embedder

    return Embedder(model_path, device="cpu", backend="torch", threads=2)


@pytest.fixture(scope="session")
def onnx_cache(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    return cache.mkdir("outpost-onnx") if cache else tmp_path_factory.mktemp("outpost-onnx")


@pytest.fixture(scope="session")
def ct2_embedder(model_path, onnx_cache):
    """The default CPU backend (``auto``: CTranslate2 int8, verified)."""
    from airflow_outpost.runners.embeddings.embedder import Embedder

    return Embedder(model_path, device="cpu", threads=2, cache_dir=onnx_cache)


@pytest.fixture(scope="session")
def int8_embedder(model_path, onnx_cache):
    from airflow_outpost.runners.embeddings.embedder import Embedder

    cache = onnx_cache
    return Embedder(model_path, device="cpu", backend="onnx-int8", threads=2, cache_dir=cache)


@pytest.fixture(scope="module")
def own_ray():
    """A Ray of the module's own (2 CPUs) kept open across its tests: the runners they call join it
    (``ray_session`` reuses a connected Ray) instead of starting one each."""
    from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

    with ray_session(RayConfig(num_cpus=2)):
        yield


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.slow)])
def engine(request) -> dict:
    """``embed_corpus`` engine arguments: the test runs in this process, and (slow: a model load per
    run in the actor) with ``engine="ray"`` on a Ray of its own."""
    if request.param == "local":
        return {"engine": "local"}
    from airflow_outpost.runners.embeddings.engines import EmbedConfig

    request.getfixturevalue("own_ray")
    return {"engine": "ray", "config": EmbedConfig(actors=1, cpus_per_actor=1.0)}


@pytest.fixture
def store(tmp_path):
    from airflow_outpost.runners.store.region_store import Store

    return Store(tmp_path / "store")


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """Mixed-length English-like documents (5-120 words), deterministic."""
    import random

    rng = random.Random(seed)
    words = ("river data model store region worker shard vector index query light ocean "
             "mountain engine report market policy health travel kitchen garden music "
             "history science energy network signal window memory budget summer winter").split()
    return [{"id": f"doc-{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 120)))}
            for i in range(n)]


def tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its content (to prove nothing was written)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cluster():
    """A real two-node Ray cluster on loopback (head + one node, 1 CPU each, token auth), one per
    test module that asks for it; stopped (only its own processes) when the module is done."""
    from tests.runners.conftest_ray import RayCluster

    c = RayCluster(num_nodes=2, cpus_per_node=1)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def no_ray_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Ray address or token from the environment: each test passes its cluster's explicitly."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
