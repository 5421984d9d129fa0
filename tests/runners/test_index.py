"""FAISS index rebuilds: recall gate, promotion, rollback, incremental updates, bad input, crashes.

Real FAISS on small clustered vectors (a few thousand x 32), so the suite runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners.errors import DimensionMismatchError, IndexStateError, InputError, ManifestError, SettingError
from airflow_outpost.runners.index.build import IndexConfig, build_index, current_version, list_versions, promote, rollback, update_index
from airflow_outpost.runners.index.search import IndexSearcher
from tests.runners.conftest_index import make_embeddings, structured_vectors, write_deleted, write_shard

DIM = 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def emb(tmp_path: Path) -> Path:
    make_embeddings(tmp_path / "emb", 6000, DIM, shards=3, seed=0)
    return tmp_path / "emb"


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "ivfsq8"])
def test_recall_gate_refuses_a_bad_index_and_keeps_current(emb: Path, tmp_path: Path, kind: str) -> None:
    idx = tmp_path / "idx"
    good = build_index(emb, idx, IndexConfig(kind="flat"))
    assert good["promoted"] and good["recall"] >= 0.99 and current_version(idx) == good["version"]

    # One probed list out of 128 on clustered data misses most true neighbours (a rerank cannot
    # bring back what the probe never proposed).
    bad = build_index(emb, idx, IndexConfig(kind=kind, nlist=128, nprobe=1, min_recall=0.95))
    assert bad["recall"] < 0.95
    assert bad["passed"] is False and bad["promoted"] is False
    assert current_version(idx) == good["version"] == bad["current"]
    assert bad["version"] in list_versions(idx)  # kept on disk for inspection, not served
    assert IndexSearcher(idx).manifest["kind"] == "flat"
    with pytest.raises(IndexStateError, match="refusing to promote"):
        promote(idx, bad["version"])
    assert current_version(idx) == good["version"]

    # The same IVF index with enough probes passes the same gate.
    ok = build_index(emb, idx, IndexConfig(kind=kind, nlist=128, nprobe=32, min_recall=0.95))
    assert ok["promoted"] and current_version(idx) == ok["version"]
    assert IndexSearcher(idx).manifest["kind"] == kind


def test_rollback_restores_the_previous_version(emb: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    v1 = build_index(emb, idx, IndexConfig(kind="flat"))["version"]
    v2 = build_index(emb, idx, IndexConfig(kind="hnsw", hnsw_m=16))["version"]
    assert current_version(idx) == v2 and IndexSearcher(idx).manifest["kind"] == "hnsw"

    assert rollback(idx) == {"current": v1, "rolled_back": v2}
    assert current_version(idx) == v1
    searcher = IndexSearcher(idx)
    assert searcher.version == v1 and searcher.manifest["kind"] == "flat"
    q = structured_vectors(5, DIM, seed=7)
    _, ids = searcher.search(q, 3)
    assert (ids >= 0).all()
    top = json.loads((idx / "manifest.json").read_text())
    assert top["current"] == v1 and top["history"] == [v1]
    with pytest.raises(IndexStateError, match="nothing to roll back"):
        rollback(idx)
    # A rolled-back version can be promoted again.
    promote(idx, v2)
    assert current_version(idx) == v2


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "ivfsq8", pytest.param("opq", marks=pytest.mark.slow)])
def test_incremental_update_matches_full_rebuild(tmp_path: Path, kind: str) -> None:
    emb = tmp_path / "emb"
    make_embeddings(emb, 4000, DIM, shards=2, seed=0)
    # nprobe = nlist makes IVF exhaustive, so both sides must agree exactly.
    cfg = IndexConfig(kind=kind, nlist=32, nprobe=32, min_recall=0.9)
    base = build_index(emb, tmp_path / "inc", cfg)
    assert base["count"] == 4000

    make_embeddings(emb, 400, DIM, shards=1, seed=1, id_offset=10_000)
    deleted = [3, 17, 2500, 10_005]
    write_deleted(emb, deleted)
    inc = update_index(emb, tmp_path / "inc")
    full = build_index(emb, tmp_path / "full", cfg)
    assert inc["mode"] == "incremental" and inc["promoted"]
    assert inc["count"] == full["count"] == 4000 + 400 - len(deleted)

    queries = structured_vectors(50, DIM, seed=42)
    s_inc, i_inc = IndexSearcher(tmp_path / "inc", k=10).search(queries)
    s_full, i_full = IndexSearcher(tmp_path / "full", k=10).search(queries)
    assert not np.isin(i_inc, deleted).any()
    assert np.isin(i_inc, np.arange(10_000, 10_400)).any()  # the new shard is searchable
    if kind in ("flat", "ivf"):
        assert np.array_equal(np.sort(i_inc, axis=1), np.sort(i_full, axis=1))
        np.testing.assert_allclose(s_inc, s_full, rtol=1e-5, atol=1e-5)
        # The gate's truth was updated from the cached lists; it must agree with a fresh exact scan.
        assert inc["recall"] == pytest.approx(1.0, abs=0.01)
    else:
        # The update keeps the base's codebooks (trained without the new rows); the reranked
        # results still agree with a rebuild's, and the rerank map follows upserts and deletions.
        same = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(i_inc, i_full, strict=True)])
        assert same >= 0.95 and inc["rerank"] and inc["recall"] >= 0.95
        vm = json.loads((Path(inc["path"]) / "manifest.json").read_text())
        keys = np.load(Path(inc["path"]) / "rerank_ids.npy")
        assert len(keys) == inc["count"] and not np.isin(deleted, keys).any() and vm["rerank"]["enabled"]
    # Nothing new: a second update adds and removes nothing.
    again = update_index(emb, tmp_path / "inc")
    assert again["mode"] == "incremental" and again["count"] == inc["count"]


def test_update_with_deletions_on_hnsw_falls_back_to_rebuild(emb: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build_index(emb, idx, IndexConfig(kind="hnsw", hnsw_m=16))
    write_deleted(emb, [1, 2, 3])
    with pytest.raises(IndexStateError, match="HNSW"):
        update_index(emb, idx, allow_rebuild=False)
    out = update_index(emb, idx)
    assert out["mode"] == "rebuild" and out["count"] == 6000 - 3


def test_update_with_the_0_1_argument_order_is_refused_and_changes_nothing(emb: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    v1 = build_index(emb, idx, IndexConfig(kind="flat"))["version"]
    make_embeddings(emb, 100, DIM, shards=1, seed=1, id_offset=10_000)
    index_manifest = (idx / "manifest.json").read_bytes()

    # 0.1 order, update_index(index_dir, embeddings_dir): both arguments give it away.
    with pytest.raises(SettingError, match="arguments look swapped") as err:
        update_index(idx, emb)
    message = str(err.value)
    assert f"embeddings_dir={str(idx)!r} is an index directory" in message
    assert f"index_dir={str(emb)!r} holds embedding shards" in message
    assert "Since 0.2 the order is update_index(embeddings_dir, index_dir)" in message
    assert list_versions(idx) == [v1] and current_version(idx) == v1
    assert (idx / "manifest.json").read_bytes() == index_manifest
    assert not (emb / "versions").exists() and not (emb / "current").exists()

    # Either side alone is enough: an index as the source, or shards where the index should go.
    with pytest.raises(SettingError, match=r"embeddings_dir=.* is an index directory.*update_index\(embeddings_dir, index_dir\)"):
        update_index(idx, tmp_path / "new-index")
    with pytest.raises(SettingError, match=r"index_dir=.* holds embedding shards.*update_index\(embeddings_dir, index_dir\)"):
        update_index(emb, emb)
    assert not (tmp_path / "new-index").exists() and list_versions(idx) == [v1]

    # The 0.2 order goes through.
    out = update_index(emb, idx)
    assert out["mode"] == "incremental" and out["count"] == 6000 + 100 and out["current"] == out["version"] != v1


def test_dimension_mismatch_is_a_clear_error_and_writes_nothing(emb: Path, tmp_path: Path) -> None:
    bad = emb / "shard-zzz.npy"
    write_shard(emb, "shard-zzz", structured_vectors(10, DIM + 8, seed=3), np.arange(90_000, 90_010))
    idx = tmp_path / "idx"
    with pytest.raises(DimensionMismatchError, match=str(bad)) as err:
        build_index(emb, idx, IndexConfig(kind="flat"))
    assert f"dimension {DIM + 8}" in str(err.value)
    assert not idx.exists()

    # Against an existing index: the update refuses, and no version is added.
    bad.unlink()
    (emb / "shard-zzz.ids.npy").unlink()
    v1 = build_index(emb, idx, IndexConfig(kind="flat"))["version"]
    write_shard(emb, "shard-zzz", structured_vectors(10, DIM + 8, seed=3), np.arange(90_000, 90_010))
    with pytest.raises(DimensionMismatchError, match="shard-zzz.npy"):
        update_index(emb, idx)
    assert list_versions(idx) == [v1] and current_version(idx) == v1


def test_bad_dtype_and_missing_ids_name_the_file(tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    write_shard(emb, "a", structured_vectors(10, DIM).astype(np.float64), np.arange(10))
    with pytest.raises(InputError, match=r"a\.npy.*float64"):
        build_index(emb, tmp_path / "idx")
    (emb / "a.npy").unlink()
    np.save(emb / "b.npy", structured_vectors(10, DIM))
    with pytest.raises(InputError, match=r"b\.npy.*no ids file"):
        build_index(emb, tmp_path / "idx")


@pytest.mark.parametrize("phase", ["adding", "writing"])
def test_crash_mid_build_leaves_current_valid(emb: Path, tmp_path: Path, phase: str) -> None:
    idx = tmp_path / "idx"
    v1 = build_index(emb, idx, IndexConfig(kind="flat"))["version"]
    q = structured_vectors(5, DIM, seed=9)
    before = IndexSearcher(idx).search(q, 5)
    # A real process death (os._exit: no cleanup handlers run) while adding vectors, or halfway
    # through writing the index file of the new version.
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import faiss
        from airflow_outpost.runners.index.build import IndexConfig, build_index
        def die(*args):
            os._exit(17)
        real_write = faiss.write_index
        def half_write(index, path):
            real_write(index, path)
            os.truncate(path, 1000)
            os._exit(17)
        if {phase!r} == "writing":
            faiss.write_index = half_write
        build_index({str(emb)!r}, {str(idx)!r}, IndexConfig(kind="flat", add_batch_rows=500),
                    on_progress=die if {phase!r} == "adding" else None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    leftovers = [p for p in (idx / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert bool(leftovers) == (phase == "writing")
    assert current_version(idx) == v1 and list_versions(idx) == [v1]
    after = IndexSearcher(idx).search(q, 5)
    assert np.array_equal(before[1], after[1])

    # The next build sweeps the leftover and gets a fresh version.
    v2 = build_index(emb, idx, IndexConfig(kind="flat"))
    assert v2["promoted"] and v2["version"] != v1
    assert not any(p.name.startswith(".tmp-") for p in (idx / "versions").iterdir())


def test_float16_shards_with_string_ids_and_lineage(tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    x = structured_vectors(1000, DIM, seed=5)
    ids = np.array([f"doc-{i}" for i in range(1000)])
    write_shard(emb, "s0", x[:600].astype(np.float16), ids[:600])
    write_shard(emb, "s1", x[600:].astype(np.float16), ids[600:])
    write_deleted(emb, ["doc-0"])
    out = build_index(emb, tmp_path / "idx", IndexConfig(kind="auto"))
    assert out["kind"] == "flat" and out["count"] == 999
    assert set(out) >= {"version", "path", "count", "recall", "promoted"}
    assert all(not isinstance(v, np.ndarray) for v in out.values())  # XCom-sized summary
    batch = IndexSearcher(tmp_path / "idx", k=3)({"vector": x[:4]})
    assert batch["neighbor_ids"][1][0] == "doc-1"
    assert "doc-0" not in batch["neighbor_ids"][0]
    manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str((emb / n).resolve()) for n in ("s0.npy", "s1.npy")]
    assert all(i["sha256"].startswith("sha256:") for i in manifest["inputs"])
    assert manifest["code_version"] and manifest["recall"]["min_recall"] == 0.9


def test_config_validation_names_the_setting(emb: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IndexConfig.kind='pq'"):
        IndexConfig(kind="pq")
    with pytest.raises(ValueError, match="min_recall"):
        IndexConfig(min_recall=1.5)
    with pytest.raises(ValueError, match="IndexConfig.on_disk=True is invalid: must be only for the IVF kinds"):
        IndexConfig(kind="hnsw", on_disk=True)
    with pytest.raises(ValueError, match="IndexConfig.pq_m=5 is invalid: must divide the dimension 32"):
        build_index(emb, tmp_path / "idx", IndexConfig(kind="ivfpq", pq_m=5))
    with pytest.raises(SettingError, match="engine='spark'"):
        build_index(emb, tmp_path / "idx", engine="spark")
    with pytest.raises(SettingError, match="HNSW graphs do not merge"):
        build_index(emb, tmp_path / "idx", IndexConfig(kind="hnsw"), engine="ray")
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("kind", ["ivfpq", "ivfsq8", pytest.param("opq", marks=pytest.mark.slow)])
def test_compressed_kinds_rerank_against_the_float_shards(tmp_path: Path, kind: str) -> None:
    emb = tmp_path / "emb"
    x = make_embeddings(emb, 6000, DIM, shards=3, seed=0)
    flat = build_index(emb, tmp_path / "flat", IndexConfig(kind="flat"))
    out = build_index(emb, tmp_path / "idx", IndexConfig(kind=kind, nprobe=16, min_recall=0.95))
    params = IndexSearcher(tmp_path / "idx").manifest["params"]
    # Parameters picked from the data: sqrt(6000) ~ 64 lists, dim/8 = 4 sub-quantizers of 7 bits.
    assert params["nlist"] == 64 and params["train_rows"] == 6000
    if kind != "ivfsq8":
        assert (params["m"], params["nbits"]) == (4, 7)
    assert out["rerank"] and out["passed"] and out["promoted"] and out["recall"] >= 0.95
    assert out["recall_without_rerank"] is not None and out["recall_without_rerank"] <= out["recall"]
    if kind != "ivfsq8":  # 4 bytes for 32 floats: approximate distances lose true neighbours
        assert out["recall_without_rerank"] < 0.9
    assert out["index_bytes"] < flat["index_bytes"] / 2 and out["search_memory_bytes"] == out["index_bytes"]

    searcher = IndexSearcher(tmp_path / "idx", k=5)
    assert searcher.reranker is not None
    q = structured_vectors(20, DIM, seed=3)
    scores, ids = searcher.search(q)
    # Reranked scores are the exact inner products with the stored float vectors.
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[ids], q), rtol=1e-5, atol=1e-5)
    plain_scores, _ = IndexSearcher(tmp_path / "idx", k=5, rerank=False).search(q)
    if kind != "ivfsq8":
        assert not np.allclose(plain_scores, scores, atol=1e-3)
    # QueryRetriever-style batches go through the same rerank.
    batch = searcher({"vector": q[:2]})
    assert np.array_equal(batch["neighbor_ids"], ids[:2])

    # A shard rewritten under the index is refused rather than reranked against other vectors.
    shard = sorted(emb.glob("shard-*[0-9].npy"))[0]
    np.save(shard, np.load(shard)[::-1].copy())
    with pytest.raises(ManifestError, match="changed since the index was built"):
        IndexSearcher(tmp_path / "idx")


def test_on_disk_lists_match_the_in_memory_index_update_and_roll_back(emb: Path, tmp_path: Path) -> None:
    cfg = IndexConfig(kind="ivfpq", nlist=32, nprobe=8)
    mem = build_index(emb, tmp_path / "mem", cfg)
    idx = tmp_path / "disk"
    # Three parts of at most 2500 rows, added apart and merged into one on-disk file.
    disk = build_index(emb, idx, IndexConfig(kind="ivfpq", nlist=32, nprobe=8, on_disk=True, group_rows=2500))
    assert disk["on_disk"] and not mem["on_disk"] and disk["count"] == mem["count"] == 6000
    assert (Path(disk["path"]) / "index.ivfdata").is_file()
    assert disk["search_memory_bytes"] < disk["index_bytes"]
    assert (disk["recall"], disk["recall_without_rerank"]) == (mem["recall"], mem["recall_without_rerank"])
    assert not [p for p in idx.iterdir() if p.name.startswith(".tmp-")]  # staging removed
    q = structured_vectors(30, DIM, seed=8)
    want = IndexSearcher(tmp_path / "mem", k=10).search(q)
    got = IndexSearcher(idx, k=10).search(q)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])

    # The lists are found next to the index file, wherever the directory now is.
    moved = tmp_path / "moved"
    os.rename(idx, moved)
    assert np.array_equal(IndexSearcher(moved, k=10).search(q)[1], want[1])
    os.rename(moved, idx)

    # Updating rebuilds (never edits the lists a reader may be serving); rollback serves v1 again.
    make_embeddings(emb, 300, DIM, shards=1, seed=1, id_offset=10_000)
    write_deleted(emb, [3])
    with pytest.raises(IndexStateError, match="keeps its inverted lists on disk"):
        update_index(emb, idx, allow_rebuild=False)
    up = update_index(emb, idx)
    assert up["mode"] == "rebuild" and up["on_disk"] and up["count"] == 6000 + 300 - 1 and up["promoted"]
    assert rollback(idx)["current"] == disk["version"]
    assert np.array_equal(IndexSearcher(idx, k=10).search(q)[1], want[1])


@pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") == "", reason="GPU hidden")
@pytest.mark.gpu
def test_gpu_build_matches_cpu(emb: Path, tmp_path: Path) -> None:
    import faiss

    if not (faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_gpu")):
        pytest.skip("no GPU FAISS on this host")
    cpu = build_index(emb, tmp_path / "cpu", IndexConfig(kind="flat", device="cpu"))
    gpu = build_index(emb, tmp_path / "gpu", IndexConfig(kind="flat", device="gpu"))
    assert gpu["recall"] == pytest.approx(cpu["recall"], abs=1e-3)


def test_embeddings_manifest_layout_later_shard_replaces_an_updated_row(tmp_path: Path) -> None:
    # The layout airflow_outpost.runners.embeddings.corpus writes: shards/ listed in manifest.json, string chunk ids,
    # deleted ids in the manifest; an updated chunk reappears in a later shard.
    emb = tmp_path / "emb"
    x = structured_vectors(300, DIM, seed=11)
    ids = np.array([f"c{i}" for i in range(300)])
    write_shard(emb / "shards", "shard-v000001", x[:200], ids[:200])
    write_shard(emb / "shards", "shard-v000002", x[200:], ids[200:])
    manifest = {"shards": [{"vectors": "shards/shard-v000001.npy", "ids": "shards/shard-v000001.ids.npy"},
                           {"vectors": "shards/shard-v000002.npy", "ids": "shards/shard-v000002.ids.npy"}],
                "deleted_ids": ["c1"]}
    (emb / "manifest.json").write_text(json.dumps(manifest))
    cfg = IndexConfig(kind="flat")
    build_index(emb, tmp_path / "idx", cfg)

    moved = structured_vectors(1, DIM, seed=99)  # c5 re-embedded to a new vector
    write_shard(emb / "shards", "shard-v000003", moved, np.array(["c5"]))
    manifest["shards"].append({"vectors": "shards/shard-v000003.npy", "ids": "shards/shard-v000003.ids.npy"})
    (emb / "manifest.json").write_text(json.dumps(manifest))
    inc = update_index(emb, tmp_path / "idx")
    full = build_index(emb, tmp_path / "full", cfg)
    assert inc["mode"] == "incremental" and inc["count"] == full["count"] == 299
    for where in ("idx", "full"):
        hit = IndexSearcher(tmp_path / where, k=1)({"vector": moved})
        assert hit["neighbor_ids"][0][0] == "c5" and hit["neighbor_scores"][0][0] == pytest.approx(1.0, abs=1e-5)
        old = IndexSearcher(tmp_path / where, k=1)({"vector": x[5:6]})
        assert old["neighbor_ids"][0][0] != "c5" or old["neighbor_scores"][0][0] < 0.999
    manifest_v = json.loads((Path(inc["path"]) / "manifest.json").read_text())
    assert manifest_v["inputs"][-1]["path"] == str((emb / "shards/shard-v000003.npy").resolve())
