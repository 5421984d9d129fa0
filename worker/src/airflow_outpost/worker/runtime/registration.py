"""Joining the control plane at start: check the server's versions, then register the worker.

:func:`register` refuses to start (:class:`StartupError`, with what to do) when the server is
unreachable within ``startup_timeout_s``, is not an Airflow 3 API server, does not serve the
installed Task SDK's Execution API version, refuses our versions or credentials, or has no Edge
worker API. A restart after a crash takes over its own row: edge3 answers 409 to a register
while the name is neither offline nor unknown, so the previous incarnation is signed off first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.edge.sysinfo import airflow_version, edge_provider_version, task_sdk_version
from airflow_outpost.worker.edge.versions import (
    SUPPORTED_LINES,
    install_hint,
    line,
    sdk_refusal,
    task_sdk_api_version,
)
from airflow_outpost.worker.errors import (
    AuthError,
    ConnectError,
    DuplicateWorkerError,
    NotFoundError,
    ServerError,
    StartupError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.hosted.gpu import GpuAllocator
    from airflow_outpost.worker.runtime.link import ControlPlaneLink

log = logging.getLogger(__name__)


def previous_run_crashed(previous_status: dict[str, Any] | None, name: str) -> bool:
    """True if this state folder's last status is ours (same name) and was not signed off."""
    previous = previous_status
    return bool(previous and previous.get("name") == name
                and previous.get("state") != "offline" and previous.get("pid") != os.getpid())


async def _check_task_sdk(client: EdgeClient, server: str) -> None:
    """Refuse to start when the server does not serve the installed Task SDK's Execution API
    version (see :mod:`airflow_outpost.worker.edge.versions`)."""
    api = task_sdk_api_version()
    if api is None:
        log.warning("could not read the installed Task SDK's Execution API version; not checking it against the "
                    "control plane's")
        return
    if await client.serves_execution_api(api) is False:
        raise StartupError(sdk_refusal(server, task_sdk_version(), api))


async def register(settings: Settings, *, client: EdgeClient, link: ControlPlaneLink, gpus: GpuAllocator,
                   sysinfo: Callable[[], dict[str, Any]], previous_status: dict[str, Any] | None) -> None:
    """Check the control plane's versions and register as ``settings.name`` (``link.registered``
    is then True); raise :class:`StartupError` saying why not. Retries only reaching the server."""
    s = settings
    s.log_folder.mkdir(parents=True, exist_ok=True)
    try:
        from airflow_outpost.worker.edge.client import retry

        server = await retry(client.server_version, what="reach control plane",
                             deadline_s=s.startup_timeout_s, base_s=0.5, cap_s=3.0)
    except ConnectError as exc:
        raise StartupError(f"cannot reach the control plane at {s.api_url} within {s.startup_timeout_s:.0f}s: {exc}") from exc
    except ServerError as exc:
        raise StartupError(f"{s.api_url} does not look like an Airflow 3 API server ({exc})") from exc
    ours = airflow_version()
    if server.split(".")[0] != ours.split(".")[0] or not server.startswith("3."):
        raise StartupError(f"incompatible server version: control plane runs Airflow {server}, this worker runs "
                           f"Airflow {ours} (Task SDK); both must be Airflow 3")
    await _check_task_sdk(client, server)
    if line(server) != line(ours):
        # An older Task SDK speaks a version the server still serves; edge3's check decides below.
        log.warning("the control plane runs Airflow %s and this worker Airflow %s; edge3 refuses the difference "
                    "unless the server sets [edge] minimum_acceptable_core_version_for_workers (%s matches)",
                    server, ours, install_hint(server))
    if line(server) not in SUPPORTED_LINES:
        log.warning("the control plane runs Airflow %s; this release is tested with Airflow %s", server,
                    ", ".join(SUPPORTED_LINES))
    try:
        try:
            reply = await client.worker.register(s.name, "starting", link.queues, sysinfo(), s.team_name)
        except DuplicateWorkerError:
            if not previous_run_crashed(previous_status, s.name):
                raise
            # Same name, same state folder, and the process that used them is gone: this is
            # our own previous incarnation, still "running" on the server. Sign it off.
            log.warning("previous run of worker %r ended without signing off; marking it offline", s.name)
            await client.worker.set_state(s.name, "offline", 0, link.queues, sysinfo(), None, s.team_name)
            reply = await client.worker.register(s.name, "starting", link.queues, sysinfo(), s.team_name)
    except DuplicateWorkerError as exc:
        raise StartupError(f"a worker named {s.name!r} is already active on the control plane; "
                           f"pick another --name or stop that worker ({exc.detail})") from exc
    except VersionMismatchError as exc:
        raise StartupError(
            f"the control plane (Airflow {server}) refused this worker's versions (Airflow {ours}, edge3 "
            f"{s.edge_provider_version or edge_provider_version(None)}): {exc.detail}. Either set [edge] "
            f"minimum_acceptable_core_version_for_workers = {ours} (and, for an edge3 mismatch, "
            "minimum_acceptable_edge_version_for_workers) on the server (edge3 3.6.0 or later), or install the "
            f"server's Airflow on this host: {install_hint(server)}; --edge-provider-version sets the edge3 "
            "version reported") from exc
    except NotFoundError as exc:
        raise StartupError(f"no Edge worker API at {s.edge_api} (HTTP {exc.status}); is the edge3 provider installed "
                           "and [edge] api_enabled=True on the server?") from exc
    except AuthError as exc:
        raise StartupError(f"the control plane refused this worker's credentials (HTTP {exc.status}): check that "
                           "jwt_secret matches the server's [api_auth] jwt_secret and the clocks agree") from exc
    except ServerError as exc:
        raise StartupError(f"registration failed: {exc}") from exc
    link.registered = True
    link.versions_match = bool(reply.get("versions_match", True)) if isinstance(reply, dict) else True
    log.info("registered as %r with %s (Airflow %s); queues=%s concurrency=%d gpus=%s",
             s.name, s.api_url, server, ",".join(link.queues or ["<all>"]), link.concurrency,
             ",".join(gpus.devices) or "none")
    if gpus.unusable_queues(link.queues):
        log.warning("queues %s match gpu_queues but this host has no GPUs: their jobs will not be fetched",
                    ",".join(gpus.unusable_queues(link.queues)))
