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
    from runners.embedder import Embedder

    fp32 = Embedder(model_path, device="cpu", backend="ct2", threads=2, cache_dir=onnx_cache)
    assert fp32.precision == "fp32"
    assert _cosine(fp32, model_path).min() >= 0.9999


def test_ct2_quality_gate_falls_back_under_auto_and_raises_when_asked(model_path, tmp_path, monkeypatch):
    from runners import _ct2_backend
    from runners.embedder import Embedder

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
    from runners.embedder import Embedder

    for first in (ct2_embedder, int8_embedder):
        again = Embedder(model_path, backend=first.backend, threads=2, cache_dir=onnx_cache)
        assert again.build == first.build
        np.testing.assert_array_equal(again.embed(["same text"]), first.embed(["same text"]))
