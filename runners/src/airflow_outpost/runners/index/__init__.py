"""FAISS indexes: builds with a recall gate, versions and promotion, incremental updates, search.

* :mod:`.build`: ``build_index`` / ``update_index`` and ``IndexConfig``.
* :mod:`.versions`: the on-disk layout of versions and the promotion log behind ``current``.
* :mod:`.search`: ``IndexSearcher``, a stateful callable over a promoted version.
* :mod:`.shards`: reading embedding shards in bounded-memory batches.
* :mod:`.recall`: exact top-k and recall@k for the recall gate.
"""
