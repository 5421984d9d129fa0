"""The control-plane protocol: the Edge worker API client, credentials and TLS, job parsing, token claims.

* :mod:`.client`: ``EdgeClient``, a thin async client for edge3's ``/edge_worker/v1`` endpoints, grouped
  by resource (``client.worker``, ``client.jobs``, ``client.logs``), with retry and error mapping.
* :mod:`.auth`: the shared-secret JWT, OIDC and token-file credentials, and the TLS context.
* :mod:`.jobs`: fetched jobs are untrusted input; ``parse_job`` validates them before anything runs.
* :mod:`.tokens`: reading (not verifying) the claims of a workload's execution token.
* :mod:`.sysinfo`: what every heartbeat reports (versions the server checks, CPU, memory, GPUs).
* :mod:`.request_counter`: how many requests the worker sends, idle and busy.
"""
