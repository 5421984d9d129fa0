"""The CPU fast backends (CTranslate2 int8, selective int8 ONNX) against the fp32 reference."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from tests.runners.conftest import make_docs


def _texts() -> list[str]:
    return [d["text"] for d in make_docs(64, seed=7)] + [
        "How do I rotate the credentials of a worker?", "Rain is expected in the north tomorrow."]


def _cosine(embedder, model_path) -> np.ndarray:
    texts = _texts()
    reference = SentenceTransformer(str(model_path), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True)
    return (embedder.embed(texts) * reference).sum(axis=1)


def test_auto_cpu_backend_is_ct2_int8_and_keeps_quality(ct2_embedder, model_path):
    assert ct2_embedder.backend == "ct2-int8" and ct2_embedder.precision == "int8"
    assert ct2_embedder.build["quantized"] is True and "fallback" not in ct2_embedder.build
    assert ct2_embedder.build["calibration_cosine"] >= 0.99
    cosine = _cosine(ct2_embedder, model_path)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert cosine.min() >= 0.97, cosine.min()


def test_ct2_fp32_matches_reference(model_path, onnx_cache):
    from airflow_outpost.runners.embeddings.embedder import Embedder

    fp32 = Embedder(model_path, device="cpu", backend="ct2", threads=2, cache_dir=onnx_cache)
    assert fp32.precision == "fp32"
    assert _cosine(fp32, model_path).min() >= 0.9999


def test_ct2_quality_gate_falls_back_under_auto_and_raises_when_asked(model_path, tmp_path, monkeypatch):
    from airflow_outpost.runners.embeddings import ct2_backend as _ct2_backend
    from airflow_outpost.runners.embeddings.embedder import Embedder

    monkeypatch.setattr(_ct2_backend, "VERIFY_COSINE", 0.99999)  # no int8 build reaches this
    auto = Embedder(model_path, device="cpu", threads=2, cache_dir=tmp_path)
    assert auto.backend == "ct2" and auto.precision == "fp32"
    assert "below the 0.99999 floor" in auto.describe()["fallback"]
    with pytest.raises(_ct2_backend.QualityGateError, match="below the 0.99999 floor"):
        Embedder(model_path, device="cpu", backend="ct2-int8", threads=2, cache_dir=tmp_path)
    # The failed verification is cached: no int8 model is kept under the final name.
    assert not any(p.name == "model" for p in tmp_path.glob("ct2-int8-*/*"))


def test_int8_selective_onnx_backend_keeps_quality(int8_embedder, model_path):
    assert int8_embedder.backend == "onnx-int8"
    assert int8_embedder.build["quantized"] is True  # a silent fp32 fallback would pass trivially
    cosine = _cosine(int8_embedder, model_path)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert cosine.min() >= 0.97, cosine.min()


def test_fast_builds_are_cached(ct2_embedder, int8_embedder, model_path, onnx_cache):
    from airflow_outpost.runners.embeddings.embedder import Embedder

    for first in (ct2_embedder, int8_embedder):
        again = Embedder(model_path, backend=first.backend, threads=2, cache_dir=onnx_cache)
        assert again.build == first.build
        np.testing.assert_array_equal(again.embed(["same text"]), first.embed(["same text"]))


def test_model_heads_after_the_transformer_run_unchanged(model_path, tmp_path):
    """A Dense head (and its pooling) runs in torch on CTranslate2's output: same vectors."""
    from sentence_transformers import models

    from airflow_outpost.runners.embeddings.embedder import Embedder

    base = SentenceTransformer(str(model_path), device="cpu")
    SentenceTransformer(modules=[base[0], base[1], models.Dense(384, 64)], device="cpu").save(
        str(tmp_path / "dense-model"))
    ct2 = Embedder(tmp_path / "dense-model", device="cpu", backend="ct2", threads=2, cache_dir=tmp_path / "c")
    ref = Embedder(tmp_path / "dense-model", device="cpu", backend="torch", threads=2)
    assert ct2.dim == ref.dim == 64
    texts = _texts()[:16]
    assert float((ct2.embed(texts) * ref.embed(texts)).sum(axis=1).min()) >= 0.9999


def test_architecture_ctranslate2_cannot_run_falls_back_to_torch(model_path, tmp_path):
    from sentence_transformers import models
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from airflow_outpost.runners.embeddings.embedder import Embedder
    from airflow_outpost.runners.errors import BackendUnavailableError

    tok = AutoTokenizer.from_pretrained(str(model_path))
    cfg = MPNetConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    MPNetModel(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    SentenceTransformer(modules=[models.Transformer(str(tmp_path / "hf")), models.Pooling(32)]).save(
        str(tmp_path / "mpnet"))
    auto = Embedder(tmp_path / "mpnet", device="cpu", threads=2, cache_dir=tmp_path / "c")
    assert auto.backend == "torch" and "cannot run MPNetModel" in auto.describe()["fallback"]
    assert auto.embed(["still works"]).shape == (1, 32)
    with pytest.raises(BackendUnavailableError, match="cannot run MPNetModel"):
        Embedder(tmp_path / "mpnet", device="cpu", backend="ct2-int8", threads=2, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*/model"))  # nothing half-converted kept
