"""Lists filled at their exact sizes hold what FAISS's own add and merge put there, in the same order."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from airflow_outpost.runners.index.exact_lists import add_exact, merge_exact

SPECS = ["IVF32,Flat", "IVF32,SQ8", "IVF32,PQ8x4", "OPQ8,IVF32,PQ8x4"]


def _lists(index: faiss.Index) -> list[tuple[np.ndarray, np.ndarray]]:
    ivf = faiss.extract_index_ivf(index)
    out = []
    for i in range(ivf.nlist):
        n = ivf.invlists.list_size(i)
        out.append((faiss.rev_swig_ptr(ivf.invlists.get_ids(i), n).copy(),
                    faiss.rev_swig_ptr(ivf.invlists.get_codes(i), n * ivf.code_size).copy()))
    return out


def _assert_same(a: faiss.Index, b: faiss.Index) -> None:
    assert a.ntotal == b.ntotal
    for (ids_a, codes_a), (ids_b, codes_b) in zip(_lists(a), _lists(b), strict=True):
        assert np.array_equal(ids_a, ids_b) and np.array_equal(codes_a, codes_b)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((6_000, 32)).astype(np.float32), rng.permutation(10**6)[:6_000].astype(np.int64)


@pytest.fixture(scope="module")
def trained(data: tuple[np.ndarray, np.ndarray]) -> dict[str, faiss.Index]:
    out = {}
    for spec in SPECS:  # trained once: OPQ's training is the slow part of this module
        out[spec] = faiss.index_factory(32, spec)
        out[spec].train(data[0])
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_add_exact_equals_add_with_ids(spec: str, data: tuple[np.ndarray, np.ndarray],
                                       trained: dict[str, faiss.Index]) -> None:
    x, ids = data
    trained = trained[spec]
    expected, got = faiss.clone_index(trained), faiss.clone_index(trained)
    expected.add_with_ids(x, ids)
    seen: list[str] = []
    added = add_exact(got, lambda: ((ids[s:s + 1000], x[s:s + 1000], f"b{s}") for s in range(0, len(x), 1000)),
                      on_first_pass=lambda batch: seen.append(batch[2]))
    assert added == len(x) and len(seen) == 6  # each batch seen once, whole
    _assert_same(expected, got)
    assert np.array_equal(expected.search(x[:20], 5)[1], got.search(x[:20], 5)[1])


def test_add_exact_refuses_batches_that_change_between_passes(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, ids = data
    index = faiss.index_factory(32, "IVF32,Flat")
    index.train(x)
    calls = []

    def batches():
        calls.append(1)
        n = 5000 if len(calls) == 1 else 6000
        yield ids[:n], x[:n]

    with pytest.raises(RuntimeError, match="more rows than the first"):
        add_exact(index, batches)


@pytest.mark.parametrize("spec", SPECS)
def test_merge_exact_equals_merge_from(spec: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path,
                                      trained: dict[str, faiss.Index]) -> None:
    x, ids = data
    trained = trained[spec]
    parts = []
    for g in range(3):
        part = faiss.clone_index(trained)
        part.add_with_ids(x[g::3], ids[g::3])
        parts.append(str(tmp_path / f"part-{g}.index"))
        faiss.write_index(part, parts[-1])
    expected, got = faiss.clone_index(trained), faiss.clone_index(trained)
    target = faiss.extract_index_ivf(expected)
    for path in parts:
        part = faiss.read_index(path)
        target.merge_from(faiss.extract_index_ivf(part), 0)
        del part
    expected.ntotal = target.ntotal
    assert merge_exact(got, parts) == len(x)
    _assert_same(expected, got)
