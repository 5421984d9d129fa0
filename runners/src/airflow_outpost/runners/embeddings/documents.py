"""Reading and validating document corpora (JSONL or Parquet rows of ``{id, text, ...}``).

A corpus is one file or a directory of partition files (``list_corpus``). ``iter_documents``
streams one partition in batches, validating every row, so memory is bounded by a batch;
``read_documents`` reads a whole file (small corpora, tests). Errors name the file and the row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from airflow_outpost.runners.errors import (
    DuplicateIdError,
    EmptyCorpusError,
    EncodingError,
    InputError,
    MissingFieldError,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Document:
    """One input document. ``row`` is its 1-based line (JSONL) or row (Parquet) number."""

    id: str
    text: str
    row: int


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """Read every document of a JSONL or Parquet corpus, validated.

    Ids may be strings or integers (integers are turned into strings). Raises
    ``MissingFieldError``, ``EncodingError``, ``DuplicateIdError``, ``EmptyCorpusError`` or
    ``InputError``, each naming ``path`` and the row. Reads only; safe to retry.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("corpus file does not exist", path=str(p))
    suffix = p.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        docs = _read_parquet(p)
    elif suffix in JSONL_SUFFIXES:
        docs = _read_jsonl(p)
    else:
        raise InputError(
            f"unsupported corpus format {suffix!r}; use one of "
            f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}",
            path=str(p),
        )
    if not docs:
        raise EmptyCorpusError("corpus holds no documents", path=str(p))
    seen: dict[str, int] = {}
    for doc in docs:
        if doc.id in seen:
            raise DuplicateIdError(
                f"id {doc.id!r} already used at row {seen[doc.id]}", path=str(p), row=doc.row
            )
        seen[doc.id] = doc.row
    return docs


@dataclass(frozen=True)
class Partition:
    """One input file of a corpus. ``id`` names it across versions: its path relative to the
    corpus directory, or ``""`` for a single-file corpus (so renaming that file is no change)."""

    id: str
    path: Path


def list_corpus(path: str | os.PathLike[str]) -> list[Partition]:
    """The partitions of a corpus: the file itself, or the JSONL/Parquet files of a directory
    (recursively, sorted, hidden and ``.tmp-`` files skipped). Raises InputError if there are none."""
    p = Path(path)
    if p.is_file():
        _check_suffix(p)
        return [Partition("", p)]
    if not p.is_dir():
        raise InputError("corpus file does not exist", path=str(p))
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise EmptyCorpusError("corpus directory holds no .jsonl or .parquet partitions", path=str(p))
    return [Partition(f.relative_to(p).as_posix(), f) for f in files]


def _check_suffix(p: Path) -> None:
    if p.suffix.lower() not in PARQUET_SUFFIXES + JSONL_SUFFIXES:
        raise InputError(
            f"unsupported corpus format {p.suffix.lower()!r}; use one of "
            f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}",
            path=str(p),
        )


def iter_documents(path: str | os.PathLike[str], batch_rows: int = 1024) -> Iterator[list[Document]]:
    """Stream the validated documents of one partition file in lists of at most ``batch_rows``.

    Raises the same errors as ``read_documents`` when it reaches a bad row (duplicate ids are
    checked by the caller, across partitions). Reads only.
    """
    p = Path(path)
    _check_suffix(p)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        yield from _iter_parquet(p, batch_rows)
        return
    batch: list[Document] = []
    with open(p, "rb") as fh:
        for row, raw in enumerate(fh, start=1):
            doc = _jsonl_row(p, row, raw)
            if doc is not None:
                batch.append(doc)
                if len(batch) >= batch_rows:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _iter_parquet(path: Path, batch_rows: int) -> Iterator[list[Document]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file: {exc}", path=str(path)) from exc
    for field in ("id", "text"):
        if field not in pf.schema_arrow.names:
            raise MissingFieldError(f"missing required column {field!r}", path=str(path), row=1)
    row = 1
    try:
        for rb in pf.iter_batches(batch_size=batch_rows, columns=["id", "text"]):
            texts = rb.column(1)
            if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
                texts = texts.cast(pa.large_binary())  # decoded below, so bad UTF-8 names its row
            batch = []
            for doc_id, text in zip(rb.column(0).to_pylist(), texts.to_pylist(), strict=True):
                batch.append(_make_document(path, row, {"id": doc_id, "text": text}))
                row += 1
            yield batch
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file: {exc}", path=str(path)) from exc


def _jsonl_row(path: Path, row: int, raw: bytes) -> Document | None:
    line = _decode(path, row, raw).strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", path=str(path), row=row) from exc
    return _make_document(path, row, record)


def _make_document(path: Path, row: int, record: object) -> Document:
    if not isinstance(record, dict):
        raise MissingFieldError("row is not a JSON object", path=str(path), row=row)
    for field in ("id", "text"):
        if field not in record or record[field] is None:
            raise MissingFieldError(f"missing required field {field!r}", path=str(path), row=row)
    doc_id, text = record["id"], record["text"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
        raise MissingFieldError(
            f"field 'id' must be a non-empty string or an integer, got {doc_id!r}",
            path=str(path),
            row=row,
        )
    if isinstance(text, bytes):
        text = _decode(path, row, text)
    if not isinstance(text, str):
        raise MissingFieldError(
            f"field 'text' must be a string, got {type(text).__name__}", path=str(path), row=row
        )
    return Document(id=str(doc_id), text=text, row=row)


def _decode(path: Path, row: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EncodingError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            path=str(path),
            row=row,
        ) from exc


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with open(path, "rb") as fh:
        for row, raw in enumerate(fh, start=1):
            doc = _jsonl_row(path, row, raw)
            if doc is not None:
                docs.append(doc)
    return docs


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet file: {exc}", path=str(path)) from exc
    for field in ("id", "text"):
        if field not in table.column_names:
            raise MissingFieldError(f"missing required column {field!r}", path=str(path), row=1)
    ids = table.column("id")
    texts = table.column("text")
    if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type):
        # Arrow does not always validate string columns on read; bytes that are not UTF-8
        # would surface later as a crash far from the file. Read them as bytes and decode here.
        texts = texts.cast(pa.large_binary())
    docs = []
    for i, (doc_id, text) in enumerate(zip(ids.to_pylist(), texts.to_pylist(), strict=True), start=1):
        docs.append(_make_document(path, i, {"id": doc_id, "text": text}))
    return docs
