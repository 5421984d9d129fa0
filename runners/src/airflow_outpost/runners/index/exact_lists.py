"""Filling an IVF index's inverted lists at their exact sizes: two passes over the data instead of one.

FAISS's ``add`` grows each inverted list like a ``std::vector`` (capacity doubled, the old buffer
copied, then freed), so an index built by streamed adds holds its lists' spare capacity and the
heap holes the copies leave: measured on 600k x 384 IVF-SQ8, 320 MB resident for 224 MB of codes
and ids; at 5M rows the build peaked at 0.40x the raw vectors for an index of 0.26x. Here the
first pass assigns every vector to its list with the coarse quantizer (the assignment ``add``
computes) and counts; each list is then sized once, and the second pass encodes each batch with
the stored assignments and writes its codes in place (``update_entries``). The lists hold what
``add_with_ids`` would put there, in the same order; the build holds the index, one batch and
4 bytes a vector for the assignments. The price is reading the vectors twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import faiss

__all__ = ["add_batches", "add_exact", "merge_exact"]

log = logging.getLogger(__name__)

# Each batch: (int64 ids, float32 vectors, anything else the caller wants back in on_first_pass).
Batches = Callable[[], Iterable[tuple[Any, ...]]]


def _transformed(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """The vectors as the IVF inside ``index`` sees them (the OPQ rotation first, for ``opq``)."""
    import faiss

    if not isinstance(index, faiss.IndexPreTransform):
        return vectors
    x = vectors
    chain: Any = index.chain  # a SWIG vector; the stubs call it a list
    for i in range(chain.size()):
        x = chain.at(i).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _lists(ivf: faiss.IndexIVF) -> Any:
    lists = ivf.invlists
    if lists is None:
        raise ValueError("the IVF index has no inverted lists")
    return lists


def add_batches(index: faiss.Index, batches: Batches, *, on_first_pass: Callable[[tuple[Any, ...]], None]
                | None = None, after_first_pass: Callable[[], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> int:
    """Add the rows of ``batches()`` to the trained, empty ``index``, with the callbacks of ``add_exact``.

    A CPU IVF index with in-memory lists is filled by ``add_exact`` (two passes); any other index
    (flat, HNSW, a GPU clone, on-disk lists) by FAISS's ``add_with_ids`` in one pass, where
    ``on_first_pass`` sees each batch as it is added and ``after_first_pass`` runs at the end.
    Returns the number of rows added.
    """
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_InvertedLists(_lists(ivf)), faiss.ArrayInvertedLists):
        return add_exact(index, batches, on_first_pass=on_first_pass, after_first_pass=after_first_pass,
                         on_progress=on_progress)
    done = 0
    for batch in batches():
        index.add_with_ids(batch[1], batch[0])
        if on_first_pass is not None:
            on_first_pass(batch)
        done += len(batch[0])
        if on_progress is not None:
            on_progress(done)
    if after_first_pass is not None:
        after_first_pass()
    return done


def add_exact(index: faiss.Index, batches: Batches, *, on_first_pass: Callable[[tuple[Any, ...]], None]
              | None = None, after_first_pass: Callable[[], None] | None = None,
              on_progress: Callable[[int], None] | None = None) -> int:
    """Add the rows of ``batches()``, tuples starting ``(int64 ids, float32 vectors, ...)``, to the
    trained, empty IVF ``index``.

    ``batches`` is called twice and must yield the same rows both times. ``on_first_pass(batch)``
    sees each batch once, whole (ground truth, id strings), and ``after_first_pass()`` runs before
    the lists are allocated (the moment to pack what it collected); ``on_progress(done)`` counts
    rows written in the second pass. Returns the number of rows added. An exception leaves the index
    half filled: the caller discards it (builds write a new version, never this index in place).
    """
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if ivf.ntotal:
        raise ValueError("add_exact fills an empty index; this one holds vectors already")
    invlists = faiss.downcast_InvertedLists(_lists(ivf))
    if not isinstance(invlists, faiss.ArrayInvertedLists):
        raise ValueError(f"add_exact needs in-memory lists, not {type(invlists).__name__}")
    chunks: list[np.ndarray] = []
    for batch in batches():
        ids, vectors = batch[0], batch[1]
        if on_first_pass is not None:
            on_first_pass(batch)
        chunks.append(ivf.quantizer.assign(_transformed(index, vectors), 1)[:, 0].astype(np.int32))
    assign = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    del chunks
    if after_first_pass is not None:
        after_first_pass()
    counts = np.bincount(assign, minlength=ivf.nlist)
    for list_no in np.nonzero(counts)[0].tolist():
        invlists.resize(list_no, int(counts[list_no]))
    fill = np.zeros(ivf.nlist, dtype=np.int64)
    done = 0
    for batch in batches():
        ids, vectors = batch[0], batch[1]
        n = len(ids)
        if done + n > len(assign):
            raise RuntimeError("add_exact: the second pass over the batches yielded more rows than the first")
        lists = assign[done:done + n].astype(np.int64)
        x = _transformed(index, vectors)
        codes = np.empty((n, ivf.code_size), dtype=np.uint8)
        ivf.encode_vectors(n, faiss.swig_ptr(x), faiss.swig_ptr(lists), faiss.swig_ptr(codes), False)
        # Stable: rows of one list keep their input order, as add_with_ids appends them.
        order = np.argsort(lists, kind="stable")
        sorted_lists = lists[order]
        sorted_ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        sorted_codes = np.ascontiguousarray(codes[order])
        present, starts, sizes = np.unique(sorted_lists, return_index=True, return_counts=True)
        for list_no, start, size in zip(present.tolist(), starts.tolist(), sizes.tolist(), strict=True):
            invlists.update_entries(list_no, int(fill[list_no]), size, faiss.swig_ptr(sorted_ids[start:start + size]),
                                    faiss.swig_ptr(sorted_codes[start:start + size]))
            fill[list_no] += size
        done += n
        if on_progress is not None:
            on_progress(done)
    if done != len(assign) or not np.array_equal(fill, counts):
        raise RuntimeError(f"add_exact: the second pass yielded {done} rows, the first {len(assign)}")
    ivf.ntotal = done
    index.ntotal = done
    return done


def merge_exact(index: faiss.Index, parts: list[str]) -> int:
    """Move the lists of the IVF index files ``parts`` (same trained quantizer) into the empty IVF
    ``index``, each list sized once to its total; the lists equal those ``merge_from`` part after
    part builds. Each part is read whole (not memory-mapped: mapped pages would count as resident)
    and dropped before the next, so the merge holds the index and one part. Returns the rows."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    invlists = faiss.downcast_InvertedLists(_lists(ivf))
    if ivf.ntotal or not isinstance(invlists, faiss.ArrayInvertedLists):
        raise ValueError("merge_exact fills an empty index with in-memory lists")
    totals = np.zeros(ivf.nlist, dtype=np.int64)
    for path in parts:
        # Memory-mapped here: only the list sizes are read, not the codes.
        mapped = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        part = faiss.extract_index_ivf(mapped)  # points into `mapped`: keep both alive together
        totals += np.array([_lists(part).list_size(i) for i in range(part.nlist)], dtype=np.int64)
        del part, mapped
    for list_no in np.nonzero(totals)[0].tolist():
        invlists.resize(list_no, int(totals[list_no]))
    fill = np.zeros(ivf.nlist, dtype=np.int64)
    for path in parts:
        whole = faiss.read_index(path)
        source = _lists(faiss.extract_index_ivf(whole))
        for list_no in range(ivf.nlist):
            size = source.list_size(list_no)
            if size:
                invlists.update_entries(list_no, int(fill[list_no]), size, source.get_ids(list_no),
                                        source.get_codes(list_no))
                fill[list_no] += size
        del source, whole
    if not np.array_equal(fill, totals):
        raise RuntimeError("merge_exact: the parts changed while they were merged")
    ivf.ntotal = index.ntotal = int(totals.sum())
    return int(index.ntotal)
