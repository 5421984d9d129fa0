"""Batch inference over local partitions, on Ray Data or as a plain in-process loop.

* :mod:`.inference`: ``run_batch_inference``, ``run_plain_loop``, ``BatchConfig``.
* :mod:`.ray_session`: connecting a task process to Ray (local, or an existing cluster, with token auth).
* :mod:`.warm_actors`: named, detached Ray actors that keep a model loaded between runs.
* :mod:`.retrieval`: ``QueryRetriever``, embed queries and search an index as a batch model.
* :mod:`.example_models`: example batch models (bring-your-own callables follow the same shape).
"""
