"""``python -m airflow_outpost``: the ``outpost`` command line."""

from airflow_outpost.worker.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
