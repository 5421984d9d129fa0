"""String ids of index rows, packed (index.id_strings): lookups, upserts, deletions, both on-disk formats,
and through a build, an incremental update and a search."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from airflow_outpost.runners.index.build import IndexConfig, build_index, update_index
from airflow_outpost.runners.index.id_strings import IdStrings, IdStringsBuilder
from airflow_outpost.runners.index.search import IndexSearcher
from airflow_outpost.runners.index.shards import ids_to_int64
from tests.runners.conftest_index import structured_vectors, write_deleted, write_shard


def _packed(pairs: list[tuple[int, str]]) -> IdStrings:
    b = IdStringsBuilder()
    b.add(np.array([k for k, _ in pairs], dtype=np.int64), [s for _, s in pairs])
    return b.build()


def test_lookup_answers_each_key_and_an_empty_string_for_a_missing_one() -> None:
    s = _packed([(5, "five"), (-3, "minus three"), (9, "nine ü"), (2**62, "")])
    assert len(s) == 4 and list(s.keys) == sorted(s.keys)
    assert s.lookup(np.array([[9, 5], [-1, -3]])) == ["nine ü", "five", "", "minus three"]
    assert s.lookup(np.arange(100, 200)) == [""] * 100  # a long lookup takes the one-copy path
    assert IdStrings.empty().lookup(np.array([1, 2])) == ["", ""] and not IdStrings.empty()


def test_a_key_added_twice_keeps_its_last_string_and_updated_upserts_then_drops() -> None:
    b = IdStringsBuilder()
    b.add(np.array([1, 2]), ["one", "two"])
    b.add(np.array([2, 3]), ["TWO", "three"])
    s = b.build()
    assert s.lookup(np.array([1, 2, 3])) == ["one", "TWO", "three"]
    t = s.updated(_packed([(3, "THREE"), (4, "four")]), removed=np.array([1, 4]))
    assert list(t.keys) == [2, 3] and t.lookup(t.keys) == ["TWO", "THREE"]


def test_both_on_disk_formats_load(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    _packed([(7, "seven"), (1, "one")]).save(tmp_path / "new")
    assert IdStrings.load(tmp_path / "new").lookup(np.array([1, 7])) == ["one", "seven"]
    old = tmp_path / "old"  # as earlier releases wrote it: unsorted keys beside a unicode array
    old.mkdir()
    np.save(old / "id_keys.npy", np.array([7, 1], dtype=np.int64))
    np.save(old / "id_strings.npy", np.array(["seven", "one"], dtype=str))
    assert IdStrings.load(old).lookup(np.array([1, 7, 8])) == ["one", "seven", ""]
    assert not IdStrings.load(tmp_path)  # integer ids: nothing saved, nothing loaded


def test_string_ids_through_an_ivf_build_an_update_and_a_search(tmp_path: Path) -> None:
    dim, emb, idx = 32, tmp_path / "emb", tmp_path / "idx"
    x = structured_vectors(3000, dim, seed=3)
    names = np.array([f"doc-{i}#0" for i in range(3000)])
    write_shard(emb, "s0", x[:1500], names[:1500])
    write_shard(emb, "s1", x[1500:2500], names[1500:2500])
    cfg = IndexConfig(kind="ivfsq8", nlist=16, nprobe=16, min_recall=0.5)
    build_index(emb, idx, cfg)
    hit = IndexSearcher(idx, k=1)({"vector": x[[10, 2000]]})
    assert [row[0] for row in hit["neighbor_ids"]] == ["doc-10#0", "doc-2000#0"]
    # New rows, doc-10 re-embedded far from where it was, doc-11 deleted.
    moved = structured_vectors(1, dim, seed=99)
    write_shard(emb, "s2", np.vstack([x[2500:], moved]), np.append(names[2500:], "doc-10#0"))
    write_deleted(emb, ["doc-11#0"])
    out = update_index(emb, idx)
    assert out["mode"] == "incremental" and out["count"] == 2999
    hit = IndexSearcher(idx, k=1)({"vector": np.vstack([x[[2900, 11]], moved])})
    got = [row[0] for row in hit["neighbor_ids"]]
    assert got[0] == "doc-2900#0" and got[1] != "doc-11#0" and got[2] == "doc-10#0"
    keys, _ = ids_to_int64(np.array(["doc-11#0"]), path=tmp_path)
    assert IdStrings.load(Path(out["path"])).lookup(keys) == [""]
