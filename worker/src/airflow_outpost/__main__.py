"""``python -m airflow_outpost``: the ``outpost`` command line.

``airflow_outpost`` is a PEP 420 namespace shared by two distributions (no ``__init__.py`` in either):
``airflow-outpost-worker`` ships this module and ``airflow_outpost.worker``, ``airflow-outpost-runners``
ships ``airflow_outpost.runners``. Each subpackage carries its own ``py.typed`` and ``__version__``.
"""

from airflow_outpost.worker.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
