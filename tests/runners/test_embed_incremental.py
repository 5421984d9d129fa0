"""Incremental, idempotent corpus embedding against the real all-MiniLM-L6-v2 model, on both engines
(the ``engine`` fixture: in this process, and on a Ray of the module's own)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_outpost.runners.embeddings.chunking import ChunkingConfig, chunk_text
from airflow_outpost.runners.embeddings.corpus import embed_corpus, read_catalog, read_vectors
from airflow_outpost.runners.embeddings.partitions import chunk_key
from airflow_outpost.runners.store import atomic as _atomic
from tests.runners.conftest import make_docs, tree, write_jsonl


def _run(path, store, embedder, engine=None, **kw):
    return embed_corpus(path, store=store, name="c", embedder=embedder, **(engine or {}), **kw)


def test_first_run_writes_shards_catalog_and_manifest(tmp_path, store, torch_embedder, engine):
    docs = make_docs(12)
    summary = _run(write_jsonl(tmp_path / "c.jsonl", docs), store, torch_embedder, engine)
    assert summary["changed"] and summary["version"] == 1 and summary["documents"] == 12
    assert summary["engine"] == engine["engine"]
    assert summary["embedded"] == summary["chunks"] == summary["added"]
    assert "text" not in json.dumps(summary).replace('"texts', "")  # no payload in XCom
    manifest = store.read_manifest("embeddings", "c")
    assert manifest["dim"] == 384 and manifest["inputs"][0]["path"].endswith("c.jsonl")
    assert manifest["model"]["weights_sha256"].startswith("sha256:")
    ids, keys, vectors = read_vectors(store, "c")
    assert len(ids) == summary["chunks"] and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ref = torch_embedder.embed([d["text"] for d in docs])
    got = dict(zip(ids, vectors, strict=True))
    assert min(float(got[f"doc-{i}#0"] @ ref[i]) for i in range(12)) > 0.9999
    assert len(set(keys.tolist())) == len(ids)
    changes = json.loads(store.path("embeddings", "c", manifest["changes"]).read_text())
    assert sorted(changes["added"]) == sorted(ids)  # each list's keys line up with its ids
    assert changes["added_keys"] == [chunk_key(c) for c in changes["added"]] and changes["updated_keys"] == []


def test_rerun_does_no_model_work_and_writes_nothing(tmp_path, store, torch_embedder, engine):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(10))
    _run(path, store, torch_embedder, engine)
    before_calls, before_tree = torch_embedder.model_calls, tree(store.root)
    summary = _run(path, store, torch_embedder, engine)
    assert torch_embedder.model_calls == before_calls  # on Ray the model is the actor's: `embedded` counts
    assert summary["changed"] is False and summary["embedded"] == 0 and summary["version"] == 1
    assert tree(store.root) == before_tree


def test_changing_one_document_reembeds_only_its_chunks(tmp_path, store, torch_embedder, engine):
    docs = make_docs(10)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    _run(path, store, torch_embedder, engine)
    ids_before, _, vec_before = read_vectors(store, "c")
    docs[3]["text"] = "a completely different text about glaciers"
    write_jsonl(path, docs)
    texts_before = torch_embedder.texts_encoded
    summary = _run(path, store, torch_embedder, engine)
    if engine["engine"] == "local":  # on Ray the texts went to the actor's model: `embedded` counts them
        assert torch_embedder.texts_encoded - texts_before == 1
    assert (summary["embedded"], summary["updated"], summary["added"]) == (1, 1, 0)
    ids, _, vectors = read_vectors(store, "c")
    old, new = dict(zip(ids_before, vec_before, strict=True)), dict(zip(ids, vectors, strict=True))
    for cid in ids:
        if cid.startswith("doc-3#"):
            assert float(old[cid] @ new[cid]) < 0.99
        else:
            np.testing.assert_array_equal(old[cid], new[cid])


def test_deleted_document_is_recorded(tmp_path, store, torch_embedder, engine):
    docs = make_docs(8)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    _run(path, store, torch_embedder, engine)
    write_jsonl(path, docs[:5] + docs[6:])
    summary = _run(path, store, torch_embedder, engine)
    assert summary["deleted_documents"] == 1 and summary["embedded"] == 0
    manifest = store.read_manifest("embeddings", "c")
    changes = json.loads(store.path("embeddings", "c", manifest["changes"]).read_text())
    assert changes["deleted_documents"] == ["doc-5"]
    assert changes["deleted"] == ["doc-5#0"] and len(changes["deleted_keys"]) == 1
    assert "doc-5#0" in manifest["deleted_ids"]
    assert all(r["doc_id"] != "doc-5" for r in read_catalog(store, "c"))


def test_crash_before_manifest_rename_keeps_previous_version(tmp_path, store, torch_embedder, monkeypatch, engine):
    docs = make_docs(6)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    _run(path, store, torch_embedder, engine)
    manifest_before = store.manifest_path("embeddings", "c").read_bytes()
    ids_before, _, vec_before = read_vectors(store, "c")
    docs[0]["text"] = "changed"
    write_jsonl(path, docs)
    real_replace = _atomic.os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash between write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(_atomic.os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        _run(path, store, torch_embedder, engine)
    monkeypatch.undo()
    assert store.manifest_path("embeddings", "c").read_bytes() == manifest_before
    ids, _, vectors = read_vectors(store, "c")
    assert ids == ids_before
    np.testing.assert_array_equal(vectors, vec_before)
    assert not list(store.path("embeddings", "c").rglob(".tmp-*"))
    summary = _run(path, store, torch_embedder, engine)  # the retry completes the interrupted version
    assert summary["version"] == 2 and summary["updated"] == 1


def test_parquet_input_and_float16_shards(tmp_path, store, torch_embedder, engine):
    docs = make_docs(5)
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(docs), path)
    summary = _run(path, store, torch_embedder, engine, dtype="float16")
    assert summary["documents"] == 5
    _, _, vectors = read_vectors(store, "c")
    assert vectors.dtype == np.float16


def test_token_chunking_with_overlap(torch_embedder, tmp_path, store, engine):
    cfg = ChunkingConfig(chunk_tokens=32, overlap_tokens=8).resolved(254)
    text = " ".join(f"word{i}" for i in range(60))
    chunks = chunk_text(torch_embedder.tokenizer, text, cfg)
    assert len(chunks) > 2 and all(c.n_tokens <= 32 for c in chunks)
    tok = torch_embedder.tokenizer
    for a, b in itertools.pairwise(chunks):
        tail = tok(a.text, add_special_tokens=False)["input_ids"][-8:]
        head = tok(b.text, add_special_tokens=False)["input_ids"][:8]
        assert tail == head  # the overlap repeats exactly overlap_tokens tokens
    summary = _run(write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "text": text}]), store,
                   torch_embedder, engine, chunking=ChunkingConfig(chunk_tokens=32, overlap_tokens=8))
    assert summary["chunks"] == len(chunks)


def test_runner_is_a_ray_style_callable(torch_embedder):
    batch = {"id": np.array(["a", "b"]), "text": np.array(["hello world", "good night"])}
    out = torch_embedder(batch)
    assert list(out["id"]) == ["a", "b"] and out["embedding"].shape == (2, 384)
    assert list(batch) == ["id", "text"]  # the input batch is not modified


def test_unchanged_documents_are_not_chunked_again(tmp_path, store, torch_embedder, monkeypatch):
    from airflow_outpost.runners.embeddings import partitions as embeddings  # where documents are cut

    docs = make_docs(10)
    docs[2]["text"] = " ".join(["long"] * 600)  # several chunks, so kept rows must keep their order
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    _run(path, store, torch_embedder, chunking=ChunkingConfig(chunk_tokens=128, overlap_tokens=16))
    catalog_before = {r["chunk_id"]: r for r in read_catalog(store, "c")}
    cut: list[str] = []
    monkeypatch.setattr(embeddings, "chunk_text", lambda tok, text, cfg: cut.append(text) or chunk_text(tok, text, cfg))
    docs[7]["text"] += " and one more sentence"
    write_jsonl(path, docs)
    summary = _run(path, store, torch_embedder, chunking=ChunkingConfig(chunk_tokens=128, overlap_tokens=16))
    assert cut == [docs[7]["text"]]  # only the changed document went through the tokenizer
    assert summary["updated"] == 1 and summary["embedded"] == 1
    after = {r["chunk_id"]: r for r in read_catalog(store, "c")}
    assert after.keys() == catalog_before.keys()
    for cid, row in after.items():
        if not cid.startswith("doc-7#"):
            assert {k: row[k] for k in ("start", "end", "content_hash", "text", "shard", "row")} == \
                   {k: catalog_before[cid][k] for k in ("start", "end", "content_hash", "text", "shard", "row")}
    # Other chunking settings cut every document again.
    cut.clear()
    _run(path, store, torch_embedder, chunking=ChunkingConfig(chunk_tokens=96, overlap_tokens=16))
    assert len(cut) == len(docs)
