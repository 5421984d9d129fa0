"""What tests, the demo and the benchmarks share: a real control plane, real worker processes, faults.

* :mod:`.controlplane`: ``ControlPlane`` starts a real ``airflow api-server``, ``scheduler`` and
  ``dag-processor`` (SQLite, Edge executor, loopback ports) in a temporary ``AIRFLOW_HOME``.
  Needs the ``dev`` extra.
* :mod:`.worker_process`: ``WorkerProc`` runs ``outpost worker`` against it; ``run_outpost`` runs
  the CLI to completion.
* :mod:`.tcp_proxy`: ``TcpProxy``, a loopback proxy a fault test can cut and restore.
* :mod:`.http_faults`: ``FaultyHttpProxy``, a loopback HTTP proxy that answers 503 to a share of
  chosen requests (log pushes by default) and forwards the rest.
* :mod:`.task_tokens`: ``TaskTokens``, task tokens for requests to the egress gateway.
"""
