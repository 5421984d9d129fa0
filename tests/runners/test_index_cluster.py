"""Index builds with ``engine="ray"`` on a real two-node Ray cluster (``ray start`` on loopback, token auth).

The shard groups are added by Ray tasks spread over both nodes; the result must equal the local
build from the same training sample, work with update/promote/rollback/IndexSearcher, and a node
killed mid-build must never leave a partial version. See ``conftest_ray.RayCluster``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.index.build import IndexConfig, build_index, current_version, list_versions, promote, rollback, update_index
from airflow_outpost.runners.index.search import IndexSearcher
from tests.runners.conftest_index import make_embeddings, structured_vectors, write_deleted
from tests.runners.conftest_ray import REPO, RayCluster

pytestmark = pytest.mark.slow
DIM = 32




def _manifest(summary: dict) -> dict:
    return json.loads((Path(summary["path"]) / "manifest.json").read_text())


@pytest.mark.timeout(300)
def test_a_flat_index_built_on_ray_equals_the_local_build(cluster: RayCluster, tmp_path: Path,
                                                          no_ray_auth_env) -> None:
    # The example pipeline's kind: its parts must merge (FAISS refused: "can only merge indexes of the same type").
    emb = tmp_path / "emb"
    make_embeddings(emb, 3000, DIM, shards=4, seed=2)
    cfg = IndexConfig(kind="flat", shard_groups=3, min_recall=0.99)
    local = build_index(emb, tmp_path / "local", cfg)
    dist = build_index(emb, tmp_path / "ray", cfg, engine="ray",
                       ray_config=RayConfig(address=cluster.address, auth_token=cluster.token))
    assert dist["engine"] == "ray" and dist["count"] == local["count"] == 3000 and dist["recall"] == local["recall"] == 1.0
    assert len(_manifest(dist)["ray"]["node_ids"]) == 2
    q = structured_vectors(20, DIM, seed=7)
    want, got = IndexSearcher(tmp_path / "local").search(q), IndexSearcher(tmp_path / "ray").search(q)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])


@pytest.mark.timeout(600)
def test_ray_build_adds_on_both_nodes_and_equals_the_local_build(cluster: RayCluster, tmp_path: Path,
                                                                 no_ray_auth_env) -> None:
    emb = tmp_path / "emb"
    make_embeddings(emb, 8000, DIM, shards=8, seed=0)
    ray_config = RayConfig(address=cluster.address, auth_token=cluster.token)
    cfg = IndexConfig(kind="ivfpq", nlist=32, nprobe=32, pq_m=8, shard_groups=4, min_recall=0.8)
    local = build_index(emb, tmp_path / "local", cfg)
    dist = build_index(emb, tmp_path / "ray", cfg, engine="ray", ray_config=ray_config)

    vm = _manifest(dist)
    assert dist["engine"] == "ray" and vm["engine"] == "ray" and vm["ray"]["address"] == cluster.address
    assert len(vm["ray"]["node_ids"]) == 2  # both nodes added groups
    assert {g["node_id"] for g in vm["ray"]["groups"]} == set(vm["ray"]["node_ids"])
    assert len(vm["ray"]["groups"]) == 4 and sum(g["rows"] for g in vm["ray"]["groups"]) == 8000
    # Same training sample, same codes: the same recall, the same truth (computed by the tasks) and results.
    assert dist["count"] == local["count"] == 8000
    assert (dist["recall"], dist["recall_without_rerank"]) == (local["recall"], local["recall_without_rerank"])
    for name in ("eval_truth_ids.npy", "rerank_ids.npy", "rerank_row.npy"):
        assert np.array_equal(np.load(Path(dist["path"]) / name), np.load(Path(local["path"]) / name)), name
    q = structured_vectors(30, DIM, seed=5)
    want, got = IndexSearcher(tmp_path / "local").search(q), IndexSearcher(tmp_path / "ray").search(q)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])

    # What Ray built takes incremental updates, rollback and promotion like any version.
    make_embeddings(emb, 300, DIM, shards=1, seed=1, id_offset=10_000)
    write_deleted(emb, [5, 10_003])
    inc = update_index(emb, tmp_path / "ray")
    assert inc["mode"] == "incremental" and inc["count"] == 8000 + 300 - 2 and inc["promoted"] and inc["recall"] >= 0.8
    assert rollback(tmp_path / "ray")["current"] == dist["version"]
    assert promote(tmp_path / "ray", inc["version"])["current"] == inc["version"]

    # On-disk lists merged from the nodes' parts.
    disk = build_index(emb, tmp_path / "ray-disk", IndexConfig(kind="ivfsq8", nlist=32, nprobe=32, on_disk=True,
                                                               shard_groups=3), engine="ray", ray_config=ray_config)
    assert disk["on_disk"] and disk["count"] == inc["count"] and disk["promoted"]
    assert len(_manifest(disk)["ray"]["node_ids"]) == 2
    _, ids = IndexSearcher(tmp_path / "ray-disk", k=10).search(q)
    assert not np.isin(ids, [5, 10_003]).any() and (ids >= 0).all()


@pytest.mark.timeout(900)
def test_node_killed_mid_build_never_publishes_a_partial_index(tmp_path: Path, no_ray_auth_env) -> None:
    emb = tmp_path / "emb"
    make_embeddings(emb, 16 * 1500, DIM, shards=16, seed=0)
    idx = tmp_path / "idx"
    c = RayCluster(num_nodes=2, cpus_per_node=1)
    try:
        c.start()
        script = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(REPO)!r})
            from airflow_outpost.runners.batch.ray_session import RayConfig
            from airflow_outpost.runners.errors import RunnerError
            from airflow_outpost.runners.index.build import IndexConfig, build_index
            try:
                out = build_index({str(emb)!r}, {str(idx)!r},
                                  IndexConfig(kind="ivfpq", nlist=32, nprobe=32, pq_m=8, min_recall=0.8,
                                              shard_groups=16, add_batch_rows=50),
                                  engine="ray", ray_config=RayConfig(address={c.address!r}, auth_token={c.token!r}))
                print(json.dumps({{"ok": out}}))
            except RunnerError as exc:
                print(json.dumps({{"error": type(exc).__name__, "retryable": exc.retryable, "message": str(exc)}}))
                sys.exit(3)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=c.env(), text=True)
        # Kill the second node (its raylet, its workers) with SIGKILL once the first part is written.
        deadline = time.monotonic() + 300
        while not list(idx.glob(".tmp-build*/part-*.faiss")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        os.killpg(c.procs[1].pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
        result = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
        if "ok" in result:
            # Retried on the surviving node: complete and gated like any build, never partial.
            out = result["ok"]
            assert proc.returncode == 0 and out["count"] == 16 * 1500 and out["promoted"] == out["passed"]
            assert list_versions(idx) == [out["version"]]
            assert current_version(idx) == (out["version"] if out["passed"] else None)
            vm = json.loads((idx / "versions" / out["version"] / "manifest.json").read_text())
            assert sum(g["rows"] for g in vm["ray"]["groups"]) == 16 * 1500
        else:
            assert proc.returncode == 3 and result.get("retryable") is True, (stdout, stderr[-3000:])
            assert list_versions(idx) == [] and current_version(idx) is None
        assert not list(idx.glob(".tmp-build*")) and not list(idx.glob("versions/.tmp-*"))
    finally:
        c.stop()
