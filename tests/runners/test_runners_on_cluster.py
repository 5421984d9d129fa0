"""Embeddings and batch inference on a real multi-node Ray cluster (head + worker node, each its own raylet).

Both runners must show work on more than one node (node ids in their manifests), equal the local
results, and survive a worker node killed mid-run (complete, or fail retryably and resume).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners.batch.inference import BatchConfig, run_batch_inference, run_plain_loop
from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.embeddings.corpus import EmbedConfig, embed_corpus, read_catalog, read_vectors
from airflow_outpost.runners.errors import ComputeLostError
from airflow_outpost.runners.store.region_store import Store
from tests.runners.conftest_ray import RayCluster, make_corpus
from tests.runners.store_writers import HashEmbedder, write_partitions

pytestmark = pytest.mark.slow


class FlagModel:
    """Length model that fails on row ``fail_on`` while ``flag`` exists: same kwargs on the rerun."""

    def __init__(self, flag: str, fail_on: int, delay_s: float = 0.0) -> None:
        self.flag, self.fail_on, self.delay_s = flag, fail_on, delay_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        if os.path.exists(self.flag) and self.fail_on in batch["id"].tolist():
            raise RuntimeError(f"boom on {self.fail_on}")
        return {"id": batch["id"], "n": np.array([len(t) for t in batch["text"]])}



def _ray(cluster: RayCluster) -> RayConfig:
    return RayConfig(address=cluster.address, auth_token=cluster.token)


@pytest.mark.timeout(300)
def test_embeddings_on_two_nodes_equal_local(cluster: RayCluster, tmp_path: Path) -> None:
    corpus = write_partitions(tmp_path / "corpus", partitions=4, docs=60)
    store = Store(tmp_path / "store")
    cfg = EmbedConfig(shard_rows=16, actors=2, cpus_per_actor=0.5, read_cpus=0.25)
    s = embed_corpus(corpus, store=store, name="ray", embedder=HashEmbedder(), engine="ray",
                     ray_config=_ray(cluster), config=cfg)
    embed_corpus(corpus, store=store, name="loc", embedder=HashEmbedder(), config=cfg)
    assert s["engine"] == "ray" and s["chunks"] == s["embedded"] == 240
    shards = store.read_manifest("embeddings", "ray")["shards"]
    assert len({e["node_id"] for e in shards}) == 2 and "local" not in {e["node_id"] for e in shards}
    cols = ("chunk_id", "key", "doc_id", "content_hash", "shard", "row", "text")
    assert [{k: r[k] for k in cols} for r in read_catalog(store, "ray")] == \
           [{k: r[k] for k in cols} for r in read_catalog(store, "loc")]
    ids_r, _, v_r = read_vectors(store, "ray")
    ids_l, _, v_l = read_vectors(store, "loc")
    assert ids_r == ids_l and float(np.min(np.sum(v_r * v_l, axis=1))) >= 0.9999


@pytest.mark.timeout(300)
def test_batch_on_two_nodes_writes_where_computed_and_resumes(cluster: RayCluster, tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=4, rows=10, fmt="jsonl")
    flag = tmp_path / "flag"
    flag.touch()
    kwargs = {"flag": str(flag), "fail_on": 35}
    cfg = BatchConfig(batch_size=5, actors=2, cpus_per_actor=0.5)
    with pytest.raises(RuntimeError, match="boom on 35"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FlagModel, kwargs, config=cfg, ray_config=_ray(cluster))
    assert not (tmp_path / "out").exists()
    flag.unlink()
    out = run_batch_inference(tmp_path / "in", tmp_path / "out", FlagModel, kwargs, config=cfg, ray_config=_ray(cluster))
    assert out["rows"] == 40 and out["resumed_partitions"] >= 1  # committed partitions were not redone
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["nodes"]) == 2 and all(o["node_id"] and o["host"] for o in manifest["outputs"])
    loop = run_plain_loop(tmp_path / "in", tmp_path / "loop", FlagModel, kwargs, batch_size=5)
    assert loop["rows"] == 40
    import pyarrow.parquet as pq

    for i in range(4):
        assert pq.read_table(tmp_path / "out" / f"part-{i:05d}.parquet").to_pylist() == \
            pq.read_table(tmp_path / "loop" / f"part-{i:05d}.parquet").to_pylist()


@pytest.mark.timeout(400)
def test_embeddings_survive_a_worker_node_killed_mid_run(tmp_path: Path) -> None:
    cluster = RayCluster(num_nodes=2, cpus_per_node=1)
    try:
        cluster.start()
        corpus = write_partitions(tmp_path / "corpus", partitions=4, docs=100)
        store = Store(tmp_path / "store")
        # Small CPU asks, so everything still fits on the head once the worker node is gone.
        cfg = EmbedConfig(shard_rows=10, actors=2, cpus_per_actor=0.25, read_cpus=0.1)
        shards = tmp_path / "store" / "embeddings" / "c" / "shards"

        def kill_worker_node() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(list(shards.glob("*-?????.npy"))) < 8:
                time.sleep(0.05)
            os.killpg(cluster.procs[1].pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_worker_node)
        killer.start()
        try:
            s = embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder(delay_s=0.1), engine="ray",
                             ray_config=_ray(cluster), config=cfg)
        except ComputeLostError as exc:
            assert exc.retryable
            s = embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder(), engine="ray",
                             ray_config=_ray(cluster), config=cfg)
            assert s["resumed"] >= 80  # what was committed before the kill is reused
        killer.join()
        assert s["chunks"] == 400 and s["embedded"] + s["resumed"] == 400
        assert len(read_catalog(store, "c")) == 400
    finally:
        cluster.stop()
