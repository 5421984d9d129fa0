"""Streaming, partitioned, resumable embeddings (issue #26 items 1-2), with the stand-in encoder.

The stand-in (``store_writers.HashEmbedder``) makes vectors a pure function of the text, so every
expected vector is recomputed here; the real model is exercised by test_embed_incremental.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners.embeddings.corpus import EmbedConfig, embed_corpus, read_catalog, read_vectors
from airflow_outpost.runners.embeddings.partitions import chunk_key
from airflow_outpost.runners.errors import DuplicateIdError
from airflow_outpost.runners.store.region_store import Store
from tests.runners.conftest import tree
from tests.runners.store_writers import HashEmbedder, PerTextEmbedder, vector, write_partitions

REPO = Path(__file__).resolve().parents[2]
_COLS = ("chunk_id", "key", "doc_id", "doc_hash", "chunk_index", "start", "end", "content_hash", "text")


def _catalog(store: Store, name: str) -> dict[str, dict]:
    return {r["chunk_id"]: {k: r[k] for k in _COLS} for r in read_catalog(store, name)}


def test_directory_corpus_streams_into_bounded_shards_and_equals_one_file(tmp_path: Path) -> None:
    corpus = write_partitions(tmp_path / "corpus", partitions=3, docs=50)
    one = tmp_path / "all.jsonl"
    one.write_text("".join(p.read_text() for p in sorted(corpus.glob("*.jsonl"))))
    store = Store(tmp_path / "store")
    s = embed_corpus(corpus, store=store, name="dir", embedder=HashEmbedder(), config=EmbedConfig(shard_rows=16))
    embed_corpus(one, store=store, name="one", embedder=HashEmbedder(), config=EmbedConfig(shard_rows=16))
    assert s["partitions"] == 3 and s["chunks"] == s["embedded"] == 150 and s["resumed"] == 0
    manifest = store.read_manifest("embeddings", "dir")
    # Bounded shards (16 rows; 50 per partition -> 4 shards each), each recording who wrote it.
    assert [e["rows"] for e in manifest["shards"]] == [16, 16, 16, 2] * 3
    assert all(e["node_id"] == "local" and e["host"] and e["input_sha256"].startswith("sha256:") and
               e["model_weights_sha256"] == HashEmbedder.record["weights_sha256"] for e in manifest["shards"])
    assert len(manifest["inputs"]) == 3
    assert _catalog(store, "dir") == _catalog(store, "one")
    ids, _, vectors = read_vectors(store, "dir")
    texts = {r["chunk_id"]: r["text"] for r in read_catalog(store, "dir")}
    np.testing.assert_allclose(vectors, np.stack([vector(texts[i]) for i in ids]), atol=1e-6)


def test_partition_changes_touch_only_that_partition(tmp_path: Path) -> None:
    corpus = write_partitions(tmp_path / "corpus", partitions=3, docs=20)
    store = Store(tmp_path / "store")
    embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder(), config=EmbedConfig(shard_rows=8))
    before = tree(store.root)
    again = embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder())
    assert again["changed"] is False and tree(store.root) == before
    # Move one document from partition 0 to 2, edit one in 1, and drop partition 2's last one.
    p0, p1, p2 = (corpus / f"part-{i:04d}.jsonl" for i in range(3))
    l0, l1, l2 = (p.read_text().splitlines() for p in (p0, p1, p2))
    moved = l0.pop(0)
    l1[3] = json.dumps({"id": "p1-d3", "text": "an edited text"})
    l2 = l2[:-1] + [moved]
    for p, lines in ((p0, l0), (p1, l1), (p2, l2)):
        p.write_text("\n".join(lines) + "\n")
    enc = HashEmbedder()
    s = embed_corpus(corpus, store=store, name="c", embedder=enc, config=EmbedConfig(shard_rows=8))
    assert (s["added"], s["updated"], s["deleted"], s["deleted_documents"]) == (0, 2, 1, 1)
    # The moved chunk is embedded again in its new partition, the edited one; nothing else.
    assert enc.texts_encoded == 2 and s["embedded"] == 2
    changes = json.loads(store.path("embeddings", "c", store.read_manifest("embeddings", "c")["changes"]).read_text())
    assert sorted(changes["updated"]) == ["p0-d0#0", "p1-d3#0"] and changes["deleted"] == ["p2-d19#0"]
    assert changes["deleted_documents"] == ["p2-d19"]
    for kind in ("added", "updated", "deleted"):  # streamed in two passes: the lists stay aligned
        assert changes[f"{kind}_keys"] == [chunk_key(c) for c in changes[kind]]
    # A partition file removed: all of its chunks are deleted.
    p1.unlink()
    s = embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder())
    assert s["deleted"] == 20 and s["deleted_documents"] == 20 and s["embedded"] == 0
    assert not any(r["doc_id"].startswith("p1-") for r in read_catalog(store, "c"))


def test_a_document_id_used_in_two_partitions_is_refused_before_any_write(tmp_path: Path) -> None:
    corpus = write_partitions(tmp_path / "corpus", partitions=2, docs=3)
    with open(corpus / "part-0001.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "p0-d1", "text": "again"}) + "\n")
    store = Store(tmp_path / "store")
    with pytest.raises(DuplicateIdError, match="part-0001.jsonl"):
        embed_corpus(corpus, store=store, name="c", embedder=HashEmbedder())
    assert tree(store.root) == {}


def _embed_proc(root: Path, corpus: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.runners.store_writers", "embed", "--root", str(root), "--name", "c",
           "--corpus", str(corpus), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})


def _committed(root: Path) -> int:
    return len(list((root / "embeddings" / "c" / "shards").glob("*-?????.npy")))


@pytest.mark.timeout(120)
def test_a_run_killed_half_way_is_resumed_not_redone(tmp_path: Path) -> None:
    # One big partition, so the unit of reuse is the shard, not the partition.
    corpus = write_partitions(tmp_path / "corpus", partitions=1, docs=400)
    root = tmp_path / "store"
    proc = _embed_proc(root, corpus, "--shard-rows", "20", "--delay-s", "0.15")
    deadline = time.monotonic() + 90
    while _committed(root) < 10 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # about half of the 20 shards are committed
    proc.wait()
    done = _committed(root)
    assert 10 <= done < 20, done
    assert Store(root).read_manifest("embeddings", "c") is None  # nothing published
    enc = HashEmbedder()
    s = embed_corpus(corpus, store=root, name="c", embedder=enc, config=EmbedConfig(shard_rows=20))
    assert s["version"] == 1 and s["chunks"] == 400
    assert s["resumed"] == done * 20 and s["embedded"] == 400 - done * 20 == enc.texts_encoded
    ids, _, vectors = read_vectors(Store(root), "c")
    texts = {r["chunk_id"]: r["text"] for r in read_catalog(Store(root), "c")}
    np.testing.assert_allclose(vectors, np.stack([vector(texts[i]) for i in ids]), atol=1e-6)


def _peak_rss_kb(root: Path, corpus: Path, engine: str) -> int:
    proc = _embed_proc(root, corpus, "--engine", engine, "--shard-rows", "4096", "--ray-cpus", "2")
    out, err = proc.communicate(timeout=3000)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    return int(summary["peak_rss_kb"])


@pytest.mark.slow
@pytest.mark.timeout(6000)
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path, engine: str) -> None:
    # Partitions of 100k one-chunk documents: 2 of them (200k chunks) vs 20 (2M). The driver's
    # peak RSS (ru_maxrss of the embed_corpus process) must stay within 1.2x; with engine="ray" the
    # partition work and the model run in Ray workers, whose memory is bounded the same way.
    per = int(os.environ.get("OUTPOST_RSS_DOCS_PER_PARTITION", "100000"))
    small = write_partitions(tmp_path / "small", partitions=2, docs=per, words=20)
    large = write_partitions(tmp_path / "large", partitions=20, docs=per, words=20, seed=1)
    rss_small = _peak_rss_kb(tmp_path / "s1", small, engine)
    rss_large = _peak_rss_kb(tmp_path / "s2", large, engine)
    assert rss_large <= 1.2 * rss_small, (rss_small, rss_large)


class _DiesAfter(HashEmbedder):
    def __init__(self, texts: int) -> None:
        super().__init__()
        self.left = texts

    def embed(self, texts):
        self.left -= len(texts)
        if self.left < 0:
            raise RuntimeError("the node went away")
        return super().embed(texts)


def test_the_work_of_a_run_that_never_published_is_removed_once_old(tmp_path: Path) -> None:
    corpus = write_partitions(tmp_path / "corpus", partitions=1, docs=100)
    root, store = tmp_path / "store", Store(tmp_path / "store")
    cfg = EmbedConfig(shard_rows=10, keep_unpublished_s=3600)
    with pytest.raises(RuntimeError, match="went away"):
        embed_corpus(corpus, store=root, name="c", embedder=_DiesAfter(50), config=cfg)
    abandoned = {p.name for p in (root / "embeddings" / "c").rglob("*") if p.is_file() and "-" in p.name}
    assert _committed(root) == 5 and store.read_manifest("embeddings", "c") is None

    def edit(n: int) -> None:  # a new document: another input hash, so other keys than the dead run's
        with open(corpus / "part-0000.jsonl", "a") as fh:
            fh.write(json.dumps({"id": f"new-{n}", "text": f"a document added later number {n}"}) + "\n")

    def files() -> set[str]:
        return {p.name for p in (root / "embeddings" / "c").rglob("*") if p.is_file()}

    edit(1)  # the retry never comes: the corpus changed first
    assert embed_corpus(corpus, store=root, name="c", embedder=HashEmbedder(), config=cfg)["version"] == 1
    assert abandoned <= files()  # within keep_unpublished_s: kept for a retry that may still come
    for name in abandoned:
        path = next((root / "embeddings" / "c").rglob(name))
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    edit(2)
    s = embed_corpus(corpus, store=root, name="c", embedder=HashEmbedder(), config=cfg)
    assert s["version"] == 2 and not abandoned & files()
    ids, _, vectors = read_vectors(store, "c")  # every published version's files are still there
    texts = {r["chunk_id"]: r["text"] for r in read_catalog(store, "c")}
    assert len(ids) == 102 and np.allclose(vectors, np.stack([vector(texts[i]) for i in ids]), atol=1e-6)


def test_keep_unpublished_s_must_be_a_finite_duration() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keep_unpublished_s"):
            EmbedConfig(keep_unpublished_s=bad)


def test_ray_shards_go_to_the_least_busy_actor(tmp_path: Path) -> None:
    # Each partition cuts into one full shard and one short one. Round robin sent every full shard to
    # the first actor and every short one to the second (96 rows against 24), so the second waited.
    from airflow_outpost.runners.batch.ray_session import RayConfig

    corpus = write_partitions(tmp_path / "corpus", partitions=6, docs=20)
    store = Store(tmp_path / "store")
    s = embed_corpus(corpus, store=store, name="b", embedder=PerTextEmbedder(0.02), engine="ray",
                     ray_config=RayConfig(num_cpus=2),
                     config=EmbedConfig(shard_rows=16, actors=2, cpus_per_actor=0.5, read_cpus=0.25))
    assert s["embedded"] == 120
    rows_by_actor: dict[int, int] = {}
    for shard in store.read_manifest("embeddings", "b")["shards"]:
        rows_by_actor[shard["pid"]] = rows_by_actor.get(shard["pid"], 0) + shard["rows"]
    assert len(rows_by_actor) == 2 and max(rows_by_actor.values()) <= 2 * min(rows_by_actor.values()), rows_by_actor
