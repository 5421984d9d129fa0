"""Region-local store: roots, names, manifests with lineage, atomic replacement, hashing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import airflow_outpost.runners as runners
from airflow_outpost.runners.errors import ManifestError, SettingError, StoreBusyError, StoreError
from airflow_outpost.runners.store import atomic as _atomic
from airflow_outpost.runners.store.region_store import ENV_ROOT, Store, hash_file, hash_tree, input_record
from airflow_outpost.runners.store.writer_lock import LockSettings


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
    assert got["rows"] == 3 and got["code_version"] == runners.__version__
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


def test_sweep_temporaries_removes_only_those_whose_owner_is_gone(store):
    d = store.path("indexes", "i")
    d.mkdir(parents=True)
    here = _atomic.owner_tag().split("~")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / f".tmp-a.bin.{here}~{int(dead.stdout)}.x1").write_bytes(b"")  # its writer exited
        (d / f".tmp-b.bin.{here}~{live.pid}.x2").write_bytes(b"")  # a live writer on this host: kept
        (d / ".tmp-c.bin.other-host~1.x3").write_bytes(b"")  # another host: its lease is over once we hold the lock
        (d / "keep.bin").write_bytes(b"")
        assert store.sweep_temporaries("indexes", "i") == 2
        assert sorted(p for p in os.listdir(d) if not p.startswith(".writer")) == [
            f".tmp-b.bin.{here}~{live.pid}.x2", "keep.bin"]
        # Without the lock only same-host dead owners qualify: the other host's file would stay.
        (d / ".tmp-d.bin.other-host~1.x4").write_bytes(b"")
        assert _atomic.sweep_orphans(d, writer_lock_held=False) == 0
    finally:
        live.kill()
        live.wait()


def test_temporary_names_record_their_owner(tmp_path):
    with _atomic.atomic_writer(tmp_path / "f.json") as fh:
        fh.write(b"{}")
        (name,) = os.listdir(tmp_path)
    assert _atomic.temp_owner(name) == (_atomic.owner_tag().split("~")[0], os.getpid())


def test_lock_settings_name_the_bad_setting():
    with pytest.raises(SettingError, match="OUTPOST_STORE_LOCK_TIMEOUT_S='soon'"):
        LockSettings.from_env({"OUTPOST_STORE_LOCK_TIMEOUT_S": "soon"})
    with pytest.raises(SettingError, match="OUTPOST_STORE_LOCK='nfs'.*auto, lease"):
        LockSettings.from_env({"OUTPOST_STORE_LOCK": "nfs"})
    got = LockSettings.from_env({"OUTPOST_STORE_LOCK": "lease", "OUTPOST_STORE_LEASE_TTL_S": "5",
                                 "OUTPOST_STORE_LOCK_HOST": "h1"})
    assert (got.mode, got.ttl_s, got.host, got.timeout_s) == ("lease", 5.0, "h1", 900.0)


def test_writer_lock_is_reentrant_and_serialises_threads(store):
    import threading

    order = []
    with store.writer_lock("results", "r") as outer, store.writer_lock("results", "r") as inner:
        assert inner is outer and outer.mode == "fcntl+lease"
        t = threading.Thread(target=lambda: _take(store, order))
        t.start()
        t.join(0.3)
        order.append("first released")
    t.join()
    assert order == ["first released", "second held"]
    with pytest.raises(StoreBusyError, match="another thread of this process"), store.writer_lock("results", "r"):
        box: list[BaseException] = []
        t = threading.Thread(target=lambda: _take(store, order, timeout_s=0.1, box=box))
        t.start()
        t.join()
        raise box[0]


def _take(store, order, timeout_s=10.0, box=None):
    try:
        with store.writer_lock("results", "r", LockSettings(timeout_s=timeout_s)):
            order.append("second held")
    except StoreBusyError as exc:
        box.append(exc)
