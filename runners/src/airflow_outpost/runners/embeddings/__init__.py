"""Embeddings: the ``Embedder`` runner, its fast backends, chunking, documents, corpus embedding.

* :mod:`.embedder`: ``Embedder``, a stateful callable (model in ``__init__``, ``__call__(texts)``).
* :mod:`.ct2_backend`, :mod:`.onnx_backend`: verified CPU fast paths (CTranslate2 int8, ONNX int8).
* :mod:`.chunking`: token-aware chunking with overlap.
* :mod:`.documents`: reading and validating JSONL/Parquet document corpora.
* :mod:`.corpus`: ``embed_corpus``, incremental and idempotent embedding into the store.
"""
