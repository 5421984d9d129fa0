"""A task process's Execution API client that checks who listens on the worker's gateway before
it sends a task token.

A task process reaches the control plane only through the worker's loopback gateway, and every
request carries its task token. Under ``crash_policy = adopt`` task processes outlive their worker:
while no worker runs, nothing listens on the gateway port, and any local user may bind it and
collect the tokens of the heartbeats and state changes sent to it. So the worker gives each task
process its own uid (``OUTPOST_GATEWAY_UID``), and before every request this client looks up the
owner of the listener on the gateway's port (``/proc/net/tcp`` and ``tcp6``,
:func:`airflow_outpost.worker.egress.gateway_file.listener_uid`): another uid, or no listener at
all, is an ``httpx.ConnectError`` and nothing is sent. The Task SDK retries connection errors as
usual (a restarted worker that binds the port again is reached; a squatter never is) and, past its
retries, fails the heartbeat or request as it would for a gateway that is down.

The task process is told the URL and the uid on its stdin by the worker (it does not read
``gateway.json``; the restarted worker checks that file before it serves the recorded port again).
The check runs before every request, so before every new connection too; a listener that takes the
port between the check and the connect is not caught (the worker's gateway would have to close in
that instant).
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from airflow_outpost.worker.egress.gateway_file import listener_uid

GATEWAY_UID_ENV = "OUTPOST_GATEWAY_UID"
# The Task SDK's own pool for its client (supervisor._ensure_client).
_LIMITS = httpx.Limits(max_keepalive_connections=1, max_connections=10)


class CheckedGatewayTransport(httpx.HTTPTransport):
    """An HTTP transport that sends a request to loopback ``port`` only while ``uid`` listens there."""

    def __init__(self, port: int, uid: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.port, self.uid = port, uid

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Raise ``httpx.ConnectError`` (sending nothing) unless the worker's uid listens on the port."""
        holder = listener_uid(self.port)
        if holder != self.uid:
            who = "nothing listens there" if holder is None else f"uid {holder} listens there"
            raise httpx.ConnectError(
                f"outpost: not sending the task token to the gateway port {self.port}: {who}, not the worker (uid {self.uid})",
                request=request,
            )
        return super().handle_request(request)


def gateway_uid_from_env() -> int | None:
    """Take ``OUTPOST_GATEWAY_UID`` out of this process's environment (the task's code has no use
    for it); ``None`` if absent or not a uid."""
    value = os.environ.pop(GATEWAY_UID_ENV, "")
    return int(value) if value.isdigit() else None


def checked_client(server: str, token: str, uid: int) -> Any:
    """The Task SDK's ``Client`` for ``server`` (the gateway URL), sending only while ``uid``
    listens on its port. The caller closes it. A URL without a port is refused (ValueError): the
    worker's gateway always has one."""
    from airflow.sdk.api.client import Client

    port = httpx.URL(server).port
    if port is None:
        raise ValueError(f"the gateway URL {server!r} has no port to check")
    return Client(base_url=server, token=token, transport=CheckedGatewayTransport(port, uid, limits=_LIMITS))
