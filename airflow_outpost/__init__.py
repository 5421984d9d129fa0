"""airflow-outpost: a remote-execution worker runtime for Apache Airflow 3.

Everything installs under this one import root:

* :mod:`airflow_outpost.worker`: the control-plane bridge. It pulls work over the Edge worker API and runs
  every workload through the Task SDK (from the repository's ``worker/`` folder).
* :mod:`airflow_outpost.runners`: the compute DAG tasks call: embeddings, FAISS indexes, Ray batch
  inference (from the repository's ``runners/`` folder; needs the ``runners`` extra).

The two meet only through configuration and the environment the worker gives each task process:
nothing in ``runners`` imports ``worker``'s internals.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("airflow-outpost")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
