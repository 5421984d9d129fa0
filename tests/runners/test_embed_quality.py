"""The CPU fast backend (selective int8 ONNX) against the fp32 sentence-transformers reference."""

from __future__ import annotations

import numpy as np
from sentence_transformers import SentenceTransformer

from tests.runners.conftest import make_docs


def test_int8_selective_backend_keeps_quality(int8_embedder, model_path):
    assert int8_embedder.backend == "onnx-int8"
    assert int8_embedder.build["quantized"] is True  # a silent fp32 fallback would pass trivially
    texts = [d["text"] for d in make_docs(64, seed=7)] + [
        "How do I rotate the credentials of a worker?", "Rain is expected in the north tomorrow."]
    reference = SentenceTransformer(str(model_path), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True)
    got = int8_embedder.embed(texts)
    cosine = (got * reference).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert cosine.min() >= 0.97, cosine.min()


def test_onnx_build_is_cached(int8_embedder, model_path, onnx_cache):
    from runners.embedder import Embedder

    again = Embedder(model_path, backend="onnx-int8", threads=2,
                     cache_dir=onnx_cache)
    assert again.build == int8_embedder.build
    np.testing.assert_array_equal(again.embed(["same text"]), int8_embedder.embed(["same text"]))
