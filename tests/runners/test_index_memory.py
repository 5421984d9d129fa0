"""An index build and its rerank hold one batch of the float shards, never the shards' pages.

Memory-mapped shards count in the builder's resident set: every page a read touches stays
mapped (and the kernel maps the cached pages around each fault), so a build that walked its
shards and then reranked candidates all over them ended with about the raw vectors resident,
whatever the index size. The build below runs in its own process and samples its file-backed
resident memory (``RssFile``) throughout; the shards are read with ``pread`` (index.npy_rows).

The index itself is built in lists sized once (index.exact_lists): FAISS's own ``add`` grows
each list like a ``std::vector``, and a streamed build held about 1.4x the index in anonymous
memory (capacity slack and the holes of the copies); and string ids were a ``dict`` of about
170 bytes a row (index.id_strings packs them). The second build samples ``RssAnon``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners.errors import InputError
from airflow_outpost.runners.index.npy_rows import NpyRows
from tests.runners.conftest_index import structured_vectors, write_shard

MIB = 2**20


def _sampling(field: str) -> str:
    """Script head: a thread that keeps the peak of ``/proc/self/status`` line ``field`` (bytes) in
    ``peak[field]``; started by ``start_sampling()``."""
    return textwrap.dedent(f"""
        import json, sys, threading, time
        peak = {{"{field}": 0}}
        def sample():
            while True:
                for line in open("/proc/self/status"):
                    if line.startswith("{field}:"):
                        peak["{field}"] = max(peak["{field}"], int(line.split()[1]) * 1024)
                time.sleep(0.005)
        def start_sampling():
            threading.Thread(target=sample, daemon=True).start()
    """)


_BUILD = _sampling("RssFile") + textwrap.dedent("""
    start_sampling()
    from airflow_outpost.runners.index.build import IndexConfig, build_index
    from airflow_outpost.runners.index.search import IndexSearcher
    import numpy as np
    baseline = peak["RssFile"]
    out = build_index(sys.argv[1], sys.argv[2], IndexConfig(kind="ivfpq", nlist=64, nprobe=16, train_sample=8192,
                                                           min_recall=0.0, add_batch_rows=8192))
    searcher = IndexSearcher(sys.argv[2])
    searcher.search(np.load(sys.argv[3]), k=10)
    time.sleep(0.05)
    print(json.dumps({"peak_file": peak["RssFile"], "baseline_file": baseline, "recall": out["recall"],
                      "rerank": out["rerank"]}))
""")


def test_a_compressed_build_and_its_rerank_keep_the_shards_out_of_memory(tmp_path: Path) -> None:
    emb, dim, shards, rows = tmp_path / "emb", 128, 4, 25_000  # 51 MB of float32 in 4 shards
    for i in range(shards):
        write_shard(emb, f"shard-{i}", structured_vectors(rows, dim, seed=i),
                    np.arange(i * rows, (i + 1) * rows, dtype=np.int64))
    np.save(tmp_path / "queries.npy", structured_vectors(500, dim, seed=99))
    run = subprocess.run([sys.executable, "-c", _BUILD, str(emb), str(tmp_path / "idx"), str(tmp_path / "queries.npy")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    raw = shards * rows * dim * 4
    # Shared libraries (FAISS, numpy) are file-backed too: allow them, not the shards.
    grown = got["peak_file"] - got["baseline_file"]
    assert grown < 30 * MIB, f"file-backed RSS grew by {grown / MIB:.0f} MiB during the build (raw {raw / MIB:.0f} MiB)"
    assert got["rerank"] and got["recall"] is not None  # the recall gate reranked against the shards


_ANON = _sampling("RssAnon") + textwrap.dedent("""
    from airflow_outpost.runners.index.build import IndexConfig, build_index
    import faiss, numpy as np
    faiss.omp_set_num_threads(1)
    start_sampling()
    time.sleep(0.05)
    baseline = peak["RssAnon"]
    out = build_index(sys.argv[1], sys.argv[2], IndexConfig(kind="ivfsq8", nlist=256, nprobe=16, train_sample=16384,
                                                           min_recall=0.0, add_batch_rows=4096, eval_queries=20,
                                                           rerank=False))
    time.sleep(0.05)
    print(json.dumps({"peak": peak["RssAnon"], "baseline": baseline, "index_bytes": out["index_bytes"]}))
""")


@pytest.mark.parametrize("ids", ["int", "str"])
def test_an_ivf_build_holds_the_index_not_its_lists_growth(tmp_path: Path, ids: str) -> None:
    emb, dim, shards, rows = tmp_path / "emb", 128, 4, 100_000  # index: 400k x (128 + 8) bytes = 54 MB
    for i in range(shards):
        numbers = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        names = numbers if ids == "int" else np.array([f"doc-{n:07d}#0" for n in numbers])
        write_shard(emb, f"shard-{i}", structured_vectors(rows, dim, seed=i), names)
    run = subprocess.run([sys.executable, "-c", _ANON, str(emb), str(tmp_path / "idx")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    grown, index = got["peak"] - got["baseline"], got["index_bytes"]
    # Beside the index: one batch, the training sample (8 MB), the assignments (1.6 MB), FAISS's buffers;
    # string ids packed (index.id_strings: 8 + 8 + 12 bytes a row here, not a dict's ~170) and the
    # packing's sort, which runs before the lists fill.
    strings = 64 * shards * rows if ids == "str" else 0
    assert grown < index * 1.1 + 16 * MIB + strings, \
        f"anonymous RSS grew by {grown / MIB:.0f} MiB for an index of {index / MIB:.0f} MiB"


def test_npy_rows_reads_ranges_and_picked_rows_as_float32(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((1000, 7)).astype(np.float16)
    np.save(tmp_path / "v.npy", x)
    with NpyRows(tmp_path / "v.npy") as rows:
        assert (rows.rows, rows.dim) == (1000, 7)
        assert np.array_equal(rows.range(990, 2000), x[990:].astype(np.float32))
        picks = np.array([5, 3, 4, 999, 0, 5, 500])
        got = rows.take(picks)
        assert got.dtype == np.float32 and np.array_equal(got, x[picks].astype(np.float32))
        with pytest.raises(InputError, match="row out of range"):
            rows.take(np.array([1000]))


def test_npy_rows_names_a_truncated_or_wrong_shaped_file(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones((100, 4), dtype=np.float32))
    data = (tmp_path / "v.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) - 64])
    with NpyRows(tmp_path / "cut.npy") as rows, pytest.raises(InputError, match="shorter than its header"):
        rows.range(0, 100)
    np.save(tmp_path / "flat.npy", np.ones(10, dtype=np.float32))
    with pytest.raises(InputError, match="expected a 2-d C-order numeric array"):
        NpyRows(tmp_path / "flat.npy")
