"""Compute that DAG tasks call on an outpost worker: embeddings, FAISS indexes, Ray batch inference.

Nothing here imports ``worker``; the worker hands task processes their configuration through
the environment (``OUTPOST_STORE_ROOT``, ``OUTPOST_REGION``, ...).
"""

__all__: list[str] = []
