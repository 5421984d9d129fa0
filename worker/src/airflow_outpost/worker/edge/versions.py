"""Which control planes this worker can serve: the Task SDK's Execution API version and Airflow lines.

Two checks decide whether a worker may run a control plane's tasks, and they are separate:

* **The Task SDK must speak the server's Execution API.** The Task SDK sends its API version
  (``Airflow-API-Version``, a date) with every request; the server (Cadwyn) translates requests
  and answers of every version it knows to its own, so an *older* Task SDK works with a newer
  server. A version the server does not know is served as the server's latest, so a *newer* Task
  SDK's payloads meet models that lack their fields: on Airflow 3.1 every task start fails on
  ``DagRun.partition_key``. The worker therefore asks the server, at start, whether it serves the
  installed Task SDK's version (the public ``/execution/openapi.json?version=...``) and refuses
  to start when it does not, with the ``pip install`` that fixes it (:func:`sdk_refusal`).
* **edge3's version check at registration.** The server compares the Airflow version the worker
  reports (its installed ``apache-airflow-core``) with its own and, unless ``[edge]
  minimum_acceptable_core_version_for_workers`` is set on the server, refuses any difference. A
  worker installed with its control plane's exact Airflow version passes on a default-configured
  server; the worker reports its real version rather than the server's, so a refusal names both.

Task SDK lines follow Airflow's: Task SDK 1.N ships with Airflow 3.N.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution

# Airflow lines this release is tested against (the README's version table).
SUPPORTED_LINES = ("3.1", "3.2", "3.3")

_API_VERSION = re.compile(r'^API_VERSION\s*(?::\s*Final\[str\])?\s*=\s*"(\d{4}-\d{2}-\d{2})"', re.M)


@cache
def task_sdk_api_version() -> str | None:
    """The Execution API version the installed Task SDK sends, read from its source without
    importing it (the worker process imports no Airflow code); None if it cannot be found."""
    try:
        dist = distribution("apache-airflow-task-sdk")
    except PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith("airflow/sdk/api/datamodels/_generated.py"):
            try:
                found = _API_VERSION.search(f.locate().read_text(encoding="utf-8"))  # type: ignore[attr-defined]
            except OSError:
                return None
            return found.group(1) if found else None
    return None


def line(version: str) -> str:
    """``"3.1.8"`` -> ``"3.1"``."""
    return ".".join(version.split(".")[:2])


def install_hint(server_version: str) -> str:
    """The command that gives this host the Airflow core of the server's version; each core release
    pins the Task SDK released with it."""
    return f"pip install 'apache-airflow-core=={server_version}'"


def sdk_refusal(server_version: str, sdk_version: str, api_version: str) -> str:
    """The one-line start-up error for a Task SDK whose Execution API the server does not serve."""
    return (f"the control plane runs Airflow {server_version}, whose Execution API does not serve version "
            f"{api_version} that this worker's Task SDK {sdk_version} speaks (the Task SDK of Airflow "
            f"{_airflow_line_of(sdk_version)}); install the control plane's line on this host: "
            f"{install_hint(server_version)}")


def _airflow_line_of(sdk_version: str) -> str:
    parts = sdk_version.split(".")
    return f"3.{parts[1]}" if len(parts) > 1 and parts[1].isdigit() else "3"
