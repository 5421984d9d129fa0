"""Rows of a 2-d ``.npy`` file read with ``pread``, never memory-mapped.

A memory-mapped shard counts in the reading process's resident set: every page a read faults
in stays mapped (and the kernel maps the cached pages around each fault too), so a build that
walks its shards, or a rerank that picks rows all over them, ends with most of the raw vectors
resident even though it needs one batch at a time. ``pread`` copies the wanted bytes out of the
page cache instead: what stays in the process is the batch it asked for, and the cache stays
the kernel's to drop.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from airflow_outpost.runners.errors import InputError

__all__ = ["NpyRows"]


class NpyRows:
    """A read-only 2-d C-order ``.npy`` file, read by row ranges or picked rows.

    Opens the file at construction; ``close()`` (or ``with``) releases the descriptor.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InputError(f"cannot open vectors: {exc}", path=str(self.path)) from exc
        try:
            with os.fdopen(os.dup(self._fd), "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:  # 3.0 (utf-8 field names) has no public reader
                    shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
                self._offset = f.tell()
        except (OSError, ValueError) as exc:
            os.close(self._fd)
            raise InputError(f"not a readable .npy array: {exc}", path=str(self.path)) from exc
        if fortran or len(shape) != 2 or dtype.hasobject:
            os.close(self._fd)
            raise InputError(f"expected a 2-d C-order numeric array, got shape {shape} dtype {dtype}"
                             f"{' in Fortran order' if fortran else ''}", path=str(self.path))
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.dtype: np.dtype = dtype
        self._row_bytes = self.dim * dtype.itemsize

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self, first_row: int, count: int) -> np.ndarray:
        want = count * self._row_bytes
        buf = bytearray(want)
        view, got = memoryview(buf), 0
        while got < want:
            n = os.preadv(self._fd, [view[got:]], self._offset + first_row * self._row_bytes + got)
            if n == 0:
                raise InputError(f"vectors file is shorter than its header says (row {first_row + got // self._row_bytes})",
                                 path=str(self.path))
            got += n
        return np.frombuffer(buf, dtype=self.dtype).reshape(count, self.dim)

    def range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32, C-contiguous, owned by the caller."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._read(start, stop - start), dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, repeats allowed) as float32; neighbouring rows are read together."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            raise InputError(f"row out of range 0..{self.rows - 1}", path=str(self.path))
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # Runs of consecutive rows become one read each.
        breaks = np.flatnonzero(np.diff(sorted_rows) > 1) + 1
        for run in np.split(np.arange(len(sorted_rows)), breaks):
            first, last = int(sorted_rows[run[0]]), int(sorted_rows[run[-1]])
            block = self._read(first, last - first + 1)
            out[order[run]] = block[sorted_rows[run] - first]
        return out
