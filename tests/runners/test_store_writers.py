"""Concurrent writers on one store name: real processes, real FAISS, the real lock (nothing mocked).

Two processes act as two hosts (``OUTPOST_STORE_LOCK_HOST``) on one store root, four threads each:
every caller embeds its own corpus into ``embeddings/c`` and then builds, updates or promotes
``indexes/c``. Both lock paths run: ``auto`` (fcntl + lease file) and ``lease`` (the lease file
alone, as on a mount without working POSIX locks).
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

from airflow_outpost.runners.embeddings.corpus import embed_corpus, read_catalog, read_vectors
from airflow_outpost.runners.errors import ManifestError, StoreBusyError
from airflow_outpost.runners.index.build import build_index, current_version, list_versions
from airflow_outpost.runners.index.search import IndexSearcher
from airflow_outpost.runners.index.versions import read_index_manifest, read_version_manifest
from airflow_outpost.runners.store.region_store import Store, hash_file
from airflow_outpost.runners.store.writer_lock import LockSettings, read_lease
from tests.runners.store_writers import HashEmbedder, index_config, vector, write_corpus

REPO = Path(__file__).resolve().parents[2]
NAME = "c"


def _env(host: str, mode: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OUTPOST_STORE_LOCK_HOST=host, OUTPOST_STORE_LOCK=mode, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["auto", "lease"])
def test_eight_concurrent_writers_on_two_hosts_publish_gapless_consistent_versions(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "store"
    store = Store(root)
    emb_dir, idx = root / "embeddings" / NAME, root / "indexes" / NAME
    # Version 1 of both, so that update_index has a base.
    seed = embed_corpus(write_corpus(tmp_path / "seed.jsonl", "seed"), store=store, name=NAME, embedder=HashEmbedder())
    build_index(emb_dir, idx, index_config())
    go = tmp_path / "go"
    procs = []
    for host, tag in (("host-a", "A"), ("host-b", "B")):
        cmd = [sys.executable, "-m", "tests.runners.store_writers", "race", "--root", str(root), "--name", NAME,
               "--tag", tag, "--work", str(tmp_path), "--go", str(go), "--out", str(tmp_path / f"{tag}.json")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(host, mode), stderr=subprocess.PIPE, text=True))
    time.sleep(1.5)  # let both interpreters import their libraries, then release all eight callers at once
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=200)
        assert p.returncode == 0, err[-3000:]
    calls = json.loads((tmp_path / "A.json").read_text()) + json.loads((tmp_path / "B.json").read_text())
    errors = [c["error"] for c in calls if "error" in c]
    assert errors == []

    # Embeddings: each caller got its own version, gapless after the seed's, and what it reported
    # (catalog and shard hashes) is what is on disk under that version's names.
    versions = sorted(c["embed"]["version"] for c in calls)
    assert seed["version"] == 1 and versions == list(range(2, 10))
    for c in calls:
        e = c["embed"]
        tag = f"v{e['version']:06d}"
        assert hash_file(emb_dir / f"catalog-{tag}.json") == e["catalog_sha256"], c["tag"]
        assert e["shards_written"] >= 1, c["tag"]
    manifest = store.read_manifest("embeddings", NAME)
    assert [h["version"] for h in manifest["history"]] == list(range(1, 10))
    for v in range(2, 10):
        changes = json.loads((emb_dir / f"changes-v{v:06d}.json").read_text())
        assert changes["version"] == v and changes["previous_version"] == v - 1
    for shard in manifest["shards"]:
        assert hash_file(emb_dir / shard["file"]) == shard["sha256"]
    # The reader's own checks pass, and every vector is the one its text gets.
    ids, _, vectors = read_vectors(store, NAME)
    texts = {r["chunk_id"]: r["text"] for r in read_catalog(store, NAME)}
    last = next(c for c in calls if c["embed"]["version"] == 9)["tag"]
    assert f"only-{last}#0" in texts and len(ids) == len(texts) == 7
    np.testing.assert_allclose(vectors, np.stack([vector(texts[i]) for i in ids]), atol=1e-6)

    # Indexes: gapless versions, one per call, each intact; no promotion lost from the history.
    index_versions = sorted(c["index"]["version"] for c in calls)
    assert index_versions == [f"v{n:06d}" for n in range(2, 10)]
    assert list_versions(idx) == [f"v{n:06d}" for n in range(1, 10)]
    for v in list_versions(idx):
        vm = read_version_manifest(idx, v)
        assert hash_file(idx / "versions" / v / "index.faiss") == vm["index_sha256"]
        assert IndexSearcher(idx, version=v).index.ntotal == vm["count"]
    promotions = 1 + sum(1 for c in calls if c["index"]["promoted"] and "promote" not in c)
    promotions += sum(1 for c in calls if "promote" in c and c["promote"]["previous"] != c["promote"]["current"])
    top = read_index_manifest(idx)
    assert len([e for e in top["events"] if e["event"] == "promote"]) == promotions
    assert top["history"][-1] == current_version(idx)
    # Nothing left behind: no temporaries, no lease.
    assert not list(root.rglob(".tmp-*")) and read_lease(emb_dir) is None and read_lease(idx) is None


def _hold(tmp_path: Path, root: Path, host: str, mode: str) -> subprocess.Popen[str]:
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "tests.runners.store_writers", "hold", "--root", str(root), "--name", NAME,
           "--work", str(tmp_path), "--ready", str(ready)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(host, mode, OUTPOST_STORE_LEASE_TTL_S="2"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["auto", "lease"])
def test_a_sigkilled_writer_on_another_host_blocks_until_its_lease_expires(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "store"
    store = Store(root)
    proc = _hold(tmp_path, root, "host-a", mode)
    corpus = write_corpus(tmp_path / "next.jsonl", "next")
    # While it lives, a second writer gives up with a retryable error that names the holder.
    with pytest.raises(StoreBusyError) as busy:
        embed_corpus(corpus, store=store, name=NAME, embedder=HashEmbedder(),
                     lock=LockSettings(mode=mode, timeout_s=0.5, host="host-b"))
    assert busy.value.retryable and (busy.value.host, busy.value.pid) == ("host-a", proc.pid)
    assert "host-a" in str(busy.value) and str(proc.pid) in str(busy.value) and busy.value.since
    held = read_lease(store.path("embeddings", NAME))
    assert held is not None and held["pid"] == proc.pid and held["fcntl"] == (mode == "auto")

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    out = embed_corpus(corpus, store=store, name=NAME, embedder=HashEmbedder(),
                       lock=LockSettings(mode=mode, timeout_s=20, host="host-b"))
    waited = time.time() - killed_at
    assert out["changed"] and out["version"] == 1
    if mode == "lease":
        # Another host's pid cannot be checked: only expiry frees it (TTL 2 s, renewed every 0.67 s).
        assert waited > 0.3
    else:
        # The kernel dropped the dead holder's fcntl lock; its lease said it had one: taken over at once.
        assert waited < 1.5
    assert read_lease(store.path("embeddings", NAME)) is None
    ids, _, vectors = read_vectors(store, NAME)
    assert "only-next#0" in ids and "only-held#0" not in ids


@pytest.mark.timeout(120)
def test_a_sigkilled_writer_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    host = LockSettings().host
    proc = _hold(tmp_path, root, host, "lease")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lease = read_lease(store.path("embeddings", NAME))
    assert lease is not None and lease["expires"] > time.time() + 0.5  # not expired: the pid check frees it
    out = embed_corpus(write_corpus(tmp_path / "next.jsonl", "next"), store=store, name=NAME,
                       embedder=HashEmbedder(), lock=LockSettings(mode="lease", timeout_s=0, host=host))
    assert out["version"] == 1


def test_a_shard_of_another_version_is_refused_on_read(tmp_path: Path) -> None:
    # What the unlocked race produced: a manifest whose shard was overwritten by another run.
    store = Store(tmp_path / "store")
    embed_corpus(write_corpus(tmp_path / "a.jsonl", "a"), store=store, name=NAME, embedder=HashEmbedder())
    shard = store.path("embeddings", NAME, *store.read_manifest("embeddings", NAME)["shards"][0]["file"].split("/"))
    other = np.load(shard)[::-1].copy()
    np.save(shard, other)
    with pytest.raises(ManifestError, match="belongs to another version"):
        read_vectors(store, NAME)
    with pytest.raises(ManifestError, match="vector shard"):
        build_index(store.path("embeddings", NAME), tmp_path / "idx", index_config())
    manifest = store.read_manifest("embeddings", NAME)
    listing = json.loads(store.path("embeddings", NAME, manifest["catalog"]).read_text())
    catalog = store.path("embeddings", NAME, *listing["parts"][0]["file"].split("/"))
    catalog.write_bytes(catalog.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="catalog"):
        read_catalog(store, NAME)
