"""What one embeddings version changed, gathered and written without holding every chunk id.

A version's change lists (added / updated / deleted chunk ids, with their int64 keys) come from
its partitions' commit records (``catalog/part-<key>.json``) and, for a partition whose input
file is gone, from its old catalog part. A first version of 2M chunks lists 2M ids: held as
Python strings and dicts that is about a gigabyte, the driver's largest allocation by far. Here
the records are read one at a time, in a few passes: what is held between passes is the deleted
chunks' keys and documents (sized by the deletions), and the ids are streamed into
``changes-v<version>.json``, so the driver's memory stays bounded by a partition, not the corpus.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from airflow_outpost.runners.embeddings.partitions import chunk_key

__all__ = ["ChangeRecord", "VersionChanges"]

# One partition's changes: {"added"|"updated"|"deleted": [[chunk_id, key], ...],
# "deleted_documents": [doc_id, ...]}; produced on demand, one at a time.
ChangeRecord = dict[str, Any]
_EMPTY = np.empty(0, dtype=np.int64)
_SPOOL_ROWS = 65_536


def _keys(pairs: list[Any]) -> np.ndarray:
    return np.fromiter((int(k) for _, k in pairs), dtype=np.int64, count=len(pairs)) if pairs else _EMPTY


def _doc_hashes(pairs: list[Any]) -> np.ndarray:
    return np.fromiter((chunk_key(c.rsplit("#", 1)[0]) for c, _ in pairs), dtype=np.int64, count=len(pairs))


class VersionChanges:
    """The changes of one version over ``sources`` (callables, each loading one ``ChangeRecord``).

    A chunk deleted from one partition and added in another (its document moved) counts as
    updated, not as both. What is held between passes is sized by the deletions (usually few),
    never by the chunks added: sources are loaded once per pass, one at a time.
    """

    def __init__(self, sources: list[Callable[[], ChangeRecord]]) -> None:
        self.sources = sources
        deleted, gone_docs = [_EMPTY], set()
        for record in self._records():
            deleted.append(_keys(record["deleted"]))
            gone_docs.update(record["deleted_documents"])
        d = np.unique(np.concatenate(deleted))
        gone = sorted(gone_docs)
        gone_hashes = np.fromiter((chunk_key(doc) for doc in gone), dtype=np.int64, count=len(gone))
        moved, alive, n_added, n_updated = [_EMPTY], np.zeros(len(gone), dtype=bool), 0, 0
        for record in self._records():
            a = _keys(record["added"])
            moved.append(a[np.isin(a, d)])
            n_added, n_updated = n_added + len(a), n_updated + len(record["updated"])
            if len(gone):
                # A document whose chunks all left its partition but live on elsewhere was not deleted.
                for pairs in (record["added"], record["updated"]):
                    alive |= np.isin(gone_hashes, _doc_hashes(pairs))
        self.moved = np.unique(np.concatenate(moved))
        self.counts = {"added": n_added - len(self.moved), "updated": n_updated + len(self.moved),
                       "deleted": int(sum(len(x) for x in deleted)) - len(self.moved)}
        self.deleted_documents = [doc for doc, live in zip(gone, alive, strict=True) if not live]

    def _records(self) -> Iterator[ChangeRecord]:
        for load in self.sources:
            yield load()

    def entries(self, kind: str) -> Iterator[tuple[str, int]]:
        """``(chunk_id, key)`` of every ``kind`` ("added", "updated" or "deleted") change, streamed."""
        for record in self._records():
            if kind == "updated":
                yield from ((c, int(k)) for c, k in record["updated"])
            source = record["deleted" if kind == "deleted" else "added"]
            moved = np.isin(_keys(source), self.moved)
            want_moved = kind == "updated"
            yield from ((c, int(k)) for (c, k), m in zip(source, moved, strict=True) if bool(m) == want_moved)

    def deleted_ids(self, previous: list[str]) -> list[str]:
        """Chunk ids deleted so far (``previous`` plus this version's) that are not live again."""
        ids = list(dict.fromkeys([*previous, *(c for c, _ in self.entries("deleted"))]))
        keys = np.fromiter((chunk_key(c) for c in ids), dtype=np.int64, count=len(ids))
        live = np.zeros(len(ids), dtype=bool)
        if len(ids):
            for record in self._records():
                live |= np.isin(keys, _keys(record["added"])) | np.isin(keys, _keys(record["updated"]))
        return sorted(c for c, is_live in zip(ids, live, strict=True) if not is_live)

    def write(self, fh: IO[bytes], *, version: int, previous_version: int | None, shards: list[str]) -> None:
        """The changes file's JSON object (its keys sorted, as the store writes JSON), to ``fh``."""
        import json

        def array(items: Iterator[Any]) -> None:
            fh.write(b"[")
            for i, item in enumerate(items):
                fh.write((", " if i else "").encode() + json.dumps(item).encode())
            fh.write(b"]")

        # Each list's keys follow its ids in the file ("added", "added_keys", ...): the ids pass
        # spools the keys (8 bytes each) to a temporary file, so the records are read once per list.
        spools: dict[str, IO[bytes]] = {}

        def ids(kind: str) -> None:
            spool = spools[kind] = tempfile.TemporaryFile()
            pending: list[int] = []

            def flush() -> None:
                np.asarray(pending, dtype="<i8").tofile(spool)
                pending.clear()

            def spooled() -> Iterator[str]:
                for chunk_id, key in self.entries(kind):
                    pending.append(key)
                    if len(pending) >= _SPOOL_ROWS:
                        flush()
                    yield chunk_id
                flush()

            array(spooled())

        def keys(kind: str) -> None:
            spool = spools.pop(kind)
            spool.seek(0)

            def unspooled() -> Iterator[int]:
                while block := spool.read(8 * _SPOOL_ROWS):
                    yield from np.frombuffer(block, dtype="<i8").tolist()

            try:
                array(unspooled())
            finally:
                spool.close()

        fields: list[tuple[str, Callable[[], object]]] = []
        for kind in ("added", "updated", "deleted"):
            fields.append((kind, functools.partial(ids, kind)))
            fields.append((f"{kind}_keys", functools.partial(keys, kind)))
        fields += [
            ("deleted_documents", lambda: array(iter(self.deleted_documents))),
            ("previous_version", lambda: fh.write(json.dumps(previous_version).encode())),
            ("shards", lambda: array(iter(shards))),
            ("version", lambda: fh.write(json.dumps(version).encode())),
        ]
        fh.write(b"{")
        for i, (name, write_value) in enumerate(sorted(fields, key=lambda f: f[0])):
            fh.write((",\n" if i else "").encode() + json.dumps(name).encode() + b": ")
            write_value()
        fh.write(b"}\n")
