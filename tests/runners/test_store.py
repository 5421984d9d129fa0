"""Region-local store: roots, names, manifests with lineage, atomic replacement, hashing."""

from __future__ import annotations

import os

import pytest

from airflow_outpost.runners.errors import ManifestError, StoreError
from airflow_outpost.runners.store import atomic as _atomic
from airflow_outpost.runners.store.region_store import ENV_ROOT, Store, hash_file, hash_tree, input_record


def test_root_from_env_and_missing_root(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "r"))
    assert Store().root == (tmp_path / "r").resolve()
    monkeypatch.delenv(ENV_ROOT)
    with pytest.raises(StoreError, match=ENV_ROOT):
        Store()


@pytest.mark.parametrize("kind,name", [("nope", "x"), ("embeddings", "../etc"), ("embeddings", "a/b"),
                                       ("embeddings", "")])
def test_path_rejects_unknown_kinds_and_unsafe_names(store, kind, name):
    with pytest.raises(StoreError):
        store.path(kind, name)


def test_manifest_round_trip_records_lineage(store, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n')
    assert store.read_manifest("results", "r1") is None
    written = store.write_manifest("results", "r1", {"rows": 3}, inputs=[input_record(src)],
                                   model={"name": "m", "weights_sha256": "sha256:00"})
    got = store.read_manifest("results", "r1")
    assert got == written
    assert got["rows"] == 3 and got["code_version"] == "0.2.0"
    assert got["inputs"][0]["sha256"] == hash_file(src)
    assert got["model"]["name"] == "m"
    assert store.list("results") == ["r1"]


def test_crash_during_manifest_replace_keeps_old_manifest(store, monkeypatch):
    store.write_manifest("results", "r1", {"generation": 1})

    def boom(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(_atomic.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_manifest("results", "r1", {"generation": 2})
    monkeypatch.undo()
    assert store.read_manifest("results", "r1")["generation"] == 1
    leftovers = [p.name for p in store.path("results", "r1").iterdir()]
    assert leftovers == ["manifest.json"]


def test_corrupt_manifest_is_reported(store):
    path = store.manifest_path("results", "bad")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        store.read_manifest("results", "bad")


def test_hash_tree_changes_with_content_and_ignores_temporaries(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"abc")
    first = hash_tree(tmp_path)
    (tmp_path / ".tmp-w.bin.123").write_bytes(b"junk")
    assert hash_tree(tmp_path) == first
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert hash_tree(tmp_path) != first


def test_sweep_temporaries(store):
    d = store.path("indexes", "i")
    d.mkdir(parents=True)
    (d / ".tmp-x.1").write_bytes(b"")
    (d / "keep.bin").write_bytes(b"")
    assert store.sweep_temporaries("indexes", "i") == 1
    assert os.listdir(d) == ["keep.bin"]
