"""What tests, the demo and the benchmarks share: an embedded, throw-away Airflow 3 control plane.

:mod:`.controlplane` starts a real ``airflow api-server``, ``scheduler`` and ``dag-processor`` (SQLite,
Edge executor, loopback ports) in a temporary ``AIRFLOW_HOME``. Needs the ``dev`` extra.
"""
