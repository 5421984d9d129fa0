"""The string ids of an index's rows, held compactly: sorted int64 keys, UTF-8 bytes and offsets.

FAISS stores int64 ids; shards written by ``embed_corpus`` name their rows with strings
(``doc-17#0``), hashed to int64 keys (``shards.ids_to_int64``), and searches answer with the
strings. A Python ``dict[int, str]`` costs about 170 bytes a row (measured: 173 MB for 1M
12-character ids), which at 5M rows adds 0.1x the raw vectors to a compressed build and to
every searcher. Here a row costs its key (8 bytes), its offset (8) and its UTF-8 bytes; lookups
are a binary search over the sorted keys.

On disk (in a version directory): ``id_keys.npy`` (sorted int64), ``id_offsets.npy`` (int64,
one more than the keys) and ``id_blob.npy`` (uint8). Versions written before this format keep
``id_keys.npy`` with ``id_strings.npy`` (a numpy unicode array) and are read as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["IdStrings", "IdStringsBuilder"]

_GATHER_ROWS = 65_536


class IdStrings:
    """Immutable key -> string map; ``len()`` rows, falsy when empty."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, blob: np.ndarray) -> None:
        self.keys, self.offsets, self.blob = keys, offsets, blob

    @classmethod
    def empty(cls) -> IdStrings:
        return cls(np.empty(0, dtype=np.int64), np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> list[str]:
        """The strings of ``keys`` (any shape, flattened), ``""`` for a key without one (FAISS's -1)."""
        flat = np.asarray(keys, dtype=np.int64).ravel()
        if not len(self.keys):
            return [""] * len(flat)
        pos = np.minimum(np.searchsorted(self.keys, flat), len(self.keys) - 1)
        found = self.keys[pos] == flat
        starts, ends = self.offsets[pos], self.offsets[pos + 1]
        blob = self.blob.tobytes() if len(flat) > 64 else None  # one copy for a big lookup, none for a small one
        out = []
        for ok, a, b in zip(found.tolist(), starts.tolist(), ends.tolist(), strict=True):
            if not ok:
                out.append("")
            else:
                out.append((blob[a:b] if blob is not None else self.blob[a:b].tobytes()).decode("utf-8"))
        return out

    def save(self, directory: Path) -> None:
        if not len(self.keys):
            return
        np.save(directory / "id_keys.npy", self.keys)
        np.save(directory / "id_offsets.npy", self.offsets)
        np.save(directory / "id_blob.npy", self.blob)

    @classmethod
    def load(cls, directory: Path) -> IdStrings:
        """The map saved in a version directory (empty if its rows have integer ids)."""
        if not (directory / "id_keys.npy").exists():
            return cls.empty()
        keys = np.load(directory / "id_keys.npy")
        if (directory / "id_offsets.npy").exists():
            return cls(keys, np.load(directory / "id_offsets.npy"), np.load(directory / "id_blob.npy"))
        builder = IdStringsBuilder()  # the earlier format: unsorted keys and a unicode array
        builder.add(keys, np.load(directory / "id_strings.npy").tolist())
        return builder.build()

    def updated(self, added: IdStrings, removed: np.ndarray) -> IdStrings:
        """This map with ``added`` upserted (its strings win for keys in both) and ``removed`` keys dropped."""
        builder = IdStringsBuilder()
        builder.add_packed(self)
        builder.add_packed(added)
        return builder.build(drop=removed)


class IdStringsBuilder:
    """Collects ``(keys, strings)`` batches as packed chunks; ``build()`` sorts them into an ``IdStrings``.
    A key added twice keeps its last string (an upsert)."""

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._blobs: list[bytes] = []

    def add(self, keys: np.ndarray, strings: list[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._keys.append(np.asarray(keys, dtype=np.int64).copy())
        self._lengths.append(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)))
        self._blobs.append(b"".join(encoded))

    def add_packed(self, strings: IdStrings) -> None:
        if len(strings):
            self._keys.append(strings.keys)
            self._lengths.append(np.diff(strings.offsets))
            self._blobs.append(strings.blob.tobytes())

    def build(self, drop: np.ndarray | None = None) -> IdStrings:
        if not self._keys:
            return IdStrings.empty()
        keys = np.concatenate(self._keys)
        lengths = np.concatenate(self._lengths)
        blob = np.frombuffer(b"".join(self._blobs), dtype=np.uint8)
        self._keys, self._lengths, self._blobs = [], [], []
        starts = np.zeros(len(keys), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        # Stable sort, then the last of each run of equal keys: later batches win.
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        last = np.ones(len(order), dtype=bool)
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        order = order[last]
        if drop is not None and drop.size:
            order = order[~np.isin(keys[order], drop)]
        out_lengths = lengths[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(out_lengths, out=offsets[1:])
        # Gather the kept strings' bytes in row chunks: an index per byte, for one chunk at a time.
        out_blob = np.empty(int(offsets[-1]), dtype=np.uint8)
        src = starts[order]
        for a in range(0, len(order), _GATHER_ROWS):
            b = min(a + _GATHER_ROWS, len(order))
            row = np.repeat(np.arange(b - a), out_lengths[a:b])
            within = np.arange(offsets[b] - offsets[a], dtype=np.int64) - (offsets[a:b] - offsets[a])[row]
            out_blob[offsets[a]:offsets[b]] = blob[src[a:b][row] + within]
        return IdStrings(keys[order], offsets, out_blob)
