"""Seeing into a running worker: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``.

* :mod:`.health`: ``HealthServer``, the small HTTP server in the worker's own event loop.
* :mod:`.http_endpoint`: ``GetEndpoint``, the minimal GET/HEAD server it and the scaler share.
* :mod:`.prometheus`: ``WorkerMetrics``, the worker's own registry, and what runners report.
"""
