"""Bad input: a clear error naming the file and row, and nothing written to the store, on both engines."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_outpost.runners.embeddings.corpus import embed_corpus
from airflow_outpost.runners.errors import (
    DimensionMismatchError,
    EmptyCorpusError,
    EncodingError,
    MissingFieldError,
    ModelNotFoundError,
    RunnerError,
)
from tests.runners.conftest import make_docs, tree, write_jsonl


def _assert_nothing_written(store, before):
    assert tree(store.root) == before


def test_missing_text_field_names_file_and_row(tmp_path, store, torch_embedder, engine):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(3) + [{"id": "x", "body": "no text"}])
    with pytest.raises(MissingFieldError, match=r"c\.jsonl, row 4: missing required field 'text'") as exc:
        embed_corpus(path, store=store, embedder=torch_embedder, **engine)
    assert exc.value.row == 4 and exc.value.retryable is False
    _assert_nothing_written(store, {})


def test_empty_corpus(tmp_path, store, torch_embedder, engine):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(EmptyCorpusError, match="empty.jsonl"):
        embed_corpus(path, store=store, embedder=torch_embedder, **engine)
    _assert_nothing_written(store, {})


def test_non_utf8_jsonl_names_row(tmp_path, store, torch_embedder, engine):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(2))
    with open(path, "ab") as fh:
        fh.write(b'{"id": "bad", "text": "caf\xe9"}\n')
    with pytest.raises(EncodingError, match=r"c\.jsonl, row 3: not valid UTF-8"):
        embed_corpus(path, store=store, embedder=torch_embedder, **engine)
    _assert_nothing_written(store, {})


def test_non_utf8_parquet_names_row(tmp_path, store, torch_embedder, engine):
    path = tmp_path / "c.parquet"
    table = pa.table({"id": ["a", "b"], "text": pa.array([b"fine", b"caf\xe9"], pa.binary())})
    pq.write_table(table, path)
    with pytest.raises(EncodingError, match=r"c\.parquet, row 2"):
        embed_corpus(path, store=store, embedder=torch_embedder, **engine)
    _assert_nothing_written(store, {})


def test_model_path_that_does_not_exist(tmp_path, store, engine):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(2))
    # On Ray the model loads in the actors: the error must still be this one, not retryable, and
    # not Ray's ActorDiedError ("lost compute") after restarting the actor.
    with pytest.raises(ModelNotFoundError, match="no-such-model") as exc:
        embed_corpus(path, store=store, model=tmp_path / "no-such-model", backend="torch", **engine)
    assert exc.value.retryable is False
    _assert_nothing_written(store, {})


def test_dimension_mismatch_with_existing_shards(tmp_path, store, torch_embedder, model_path, engine):
    from sentence_transformers import SentenceTransformer, models

    from airflow_outpost.runners.embeddings.embedder import Embedder

    path = write_jsonl(tmp_path / "c.jsonl", make_docs(4))
    embed_corpus(path, store=store, name="c", embedder=torch_embedder, **engine)
    before = tree(store.root)
    base = SentenceTransformer(str(model_path), device="cpu")
    small = SentenceTransformer(modules=[base[0], base[1], models.Dense(384, 64)], device="cpu")
    small.save(str(tmp_path / "small-model"))
    other = Embedder(tmp_path / "small-model", backend="torch")
    assert other.dim == 64
    calls = other.model_calls
    with pytest.raises(DimensionMismatchError, match="dimension 384.*produces 64") as exc:
        embed_corpus(path, store=store, name="c", embedder=other, **engine)
    assert isinstance(exc.value, RunnerError) and other.model_calls == calls
    _assert_nothing_written(store, before)
