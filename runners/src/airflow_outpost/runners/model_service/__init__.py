"""The worker-local model service: models stay loaded between task processes.

* :mod:`.service`: the service process (one per worker, on a Unix socket).
* :mod:`.client`: ``ModelClient`` and ``ServiceEmbedder`` (an ``Embedder`` that uses the service).
* :mod:`.protocol`: the wire format both sides share.
"""
