"""The outpost worker: joins an Airflow 3 control plane over the Edge worker API and runs every
workload through the Task SDK.

Subpackages, by concern (each one's docstring says what lives there):

* :mod:`.edge`: the control-plane protocol (Edge client, credentials, job parsing, tokens).
* :mod:`.runtime`: the worker process (``Worker``, job runner, outbox, recovery, state folder).
* :mod:`.processes`: task processes (launcher, zygote, entry point).
* :mod:`.egress`: what leaves the region (gateway, policy, ledger, outage hold, redaction, XCom).
* :mod:`.hosted`: GPUs, costs, the Ray head and the model service the worker hosts for tasks.
* :mod:`.observability`: health endpoints and Prometheus metrics.
* :mod:`.cli`: the ``outpost`` command line.
* :mod:`.testing`: the embedded control plane and the worker processes tests share.

This package's own namespace stays light, because task processes import it too (the XCom backend
lives here): settings and errors only. ``Worker`` is ``airflow_outpost.worker.runtime.worker.Worker``.
"""

from importlib.metadata import PackageNotFoundError, version

from airflow_outpost.worker.config import Settings, load_settings
from airflow_outpost.worker.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    DuplicateWorkerError,
    JobRejected,
    NotFoundError,
    OutpostError,
    ServerError,
    StartupError,
    TransientServerError,
    VersionMismatchError,
)

try:
    __version__: str = version("airflow-outpost-worker")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "AuthError",
    "ConfigError",
    "ConnectError",
    "DuplicateWorkerError",
    "JobRejected",
    "NotFoundError",
    "OutpostError",
    "ServerError",
    "Settings",
    "StartupError",
    "TransientServerError",
    "VersionMismatchError",
    "load_settings",
]
