"""Reading and validating document corpora (JSONL or Parquet rows of ``{id, text, ...}``).

The whole corpus is read and validated before anything else happens, so bad input fails the
task with an error that names the file and the row, and nothing has been written yet.
"""

from __future__ import annotations

import json
import os
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
            line = _decode(path, row, raw).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"invalid JSON: {exc.msg}", path=str(path), row=row) from exc
            docs.append(_make_document(path, row, record))
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
