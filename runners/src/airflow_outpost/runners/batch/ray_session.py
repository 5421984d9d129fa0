"""Connecting a task process to Ray: a local Ray started on demand, or an existing cluster, with token auth.

How Ray 2.60 authenticates (read from the installed package, ``ray/_private/authentication``):
the mode comes from the ``RAY_AUTH_MODE`` environment variable (``token`` or ``disabled``) and
the token from ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``; both are read by the C++ core, so they must be in ``os.environ``.
``ray.init()`` of a new local cluster turns token mode on by default and writes
``~/.ray/auth_token`` if no token exists; ``ray start`` turns it on when a token is available.
A driver that joins by explicit address only sends a token in token mode: without it, or with
a wrong token, the GCS answers ``Unauthenticated`` and ``ray.init`` retries for about 20 s
before raising ``ConnectionError``.

So ``ray_session`` always decides the mode itself: a local Ray gets a fresh random token
passed through the environment (nothing is written to the home directory); an existing cluster
is joined in token mode with the configured token (``RayConfig.auth_token``,
``auth_token_path``, or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``). A missing token fails at
once; an unreachable address fails after ``connect_timeout_s``; a rejected token fails after
Ray's bounded retries with a message that says so. The variables are restored on exit.

Ray itself binds its gRPC ports on all interfaces whatever address is used to reach it; the
token is what keeps other hosts out.

``address=None`` is a Ray of the task's own, never someone else's: plain ``ray.init()`` joins
whatever cluster ``RAY_ADDRESS`` or the ``ray_current_cluster`` file in Ray's temp folder
(``/tmp/ray``, written by any user's ``ray start --head``) names, which on a shared host sends
the task's data to another team's cluster (or fails: "num_cpus and num_gpus must not be
provided"). So the session calls ``ray.init(address="local")``, which Ray documents as "start a
new local Ray instance" and which reads neither, and hides ``RAY_ADDRESS`` from the process
(and the Ray processes it starts) for the duration. Joining needs an explicit address; ``"auto"``
keeps Ray's discovery for those who want it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Defined with the other runner errors; re-exported here, where they are raised.
from airflow_outpost.runners.errors import RayAuthError, RayConnectError
from airflow_outpost.runners.results import RaySessionInfo

__all__ = ["RayAuthError", "RayConfig", "RayConnectError", "RaySessionInfo", "ray_session"]

log = logging.getLogger(__name__)
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_SAVED_VARS = (*_AUTH_VARS, "RAY_ADDRESS")


@dataclass(frozen=True)
class RayConfig:
    """Where Ray runs. ``address=None`` starts a new local Ray for the session (``num_cpus`` CPUs,
    default all), ignoring ``RAY_ADDRESS`` and any cluster another Ray user started on the host;
    ``"auto"`` (Ray's discovery: ``RAY_ADDRESS``, then the host's latest ``ray start``),
    ``"host:port"`` or ``"ray://host:port"`` joins an existing cluster.

    ``auth_mode="token"`` (Ray 2.60's default) sends the token; ``"disabled"`` joins clusters
    started with ``RAY_AUTH_MODE=disabled``. ``runtime_env`` is passed to ``ray.init`` (for
    example ``{"py_modules": [...]}`` when the cluster does not have this package installed).
    """

    address: str | None = None
    num_cpus: int | None = None
    auth_mode: str = "token"
    auth_token: str | None = field(default=None, repr=False)
    auth_token_path: str | None = None
    connect_timeout_s: float = 10.0
    runtime_env: Mapping[str, Any] | None = None
    object_store_memory: int | None = None
    log_to_driver: bool = False

    def __post_init__(self) -> None:
        if self.auth_mode not in ("token", "disabled"):
            raise ValueError(f"RayConfig.auth_mode={self.auth_mode!r} is invalid: must be 'token' or 'disabled'")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"RayConfig.num_cpus={self.num_cpus!r} is invalid: must be >= 1 or None")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"RayConfig.connect_timeout_s={self.connect_timeout_s!r} is invalid: must be > 0")
        if self.address is not None and self.address != "auto" and ":" not in self.address:
            raise ValueError(
                f"RayConfig.address={self.address!r} is invalid: use None, 'auto', 'host:port' or 'ray://host:port'"
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> RayConfig:
        """The Ray the worker configured for its tasks, with ``overrides`` applied on top.

        ``OUTPOST_RAY_ADDRESS`` (set by ``outpost worker --ray ...``) selects an existing cluster
        (or the worker's own persistent local Ray); unset means a local Ray started on demand.
        The token comes from ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` as in ``resolve_token``.
        ``num_cpus`` in ``overrides`` only applies to a Ray started on demand, so a DAG can say
        ``RayConfig.from_env(num_cpus=2)`` and still join the worker's cluster when there is one.
        """
        address = os.environ.get("OUTPOST_RAY_ADDRESS", "").strip() or None
        if address is not None and "address" not in overrides:
            overrides = {k: v for k, v in overrides.items() if k != "num_cpus"}
        return cls(**{"address": address, **overrides})

    def resolve_token(self) -> str | None:
        """The token to present: explicit value, then token file, then the RAY_AUTH_* environment."""
        if self.auth_token:
            return self.auth_token.strip()
        path = self.auth_token_path or os.environ.get("RAY_AUTH_TOKEN_PATH")
        if path:
            try:
                token = Path(path).expanduser().read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise RayAuthError(f"cannot read the Ray auth token file {path}: {exc}") from exc
            if not token:
                raise RayAuthError(f"the Ray auth token file {path} is empty")
            return token
        return os.environ.get("RAY_AUTH_TOKEN", "").strip() or None


def _reset_ray_auth_cache() -> None:
    # The core caches mode and token per process; refresh both so a later session sees new values.
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # private, untyped
    except ImportError:  # pragma: no cover - Ray builds without token auth
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast (RayConnectError) if nothing listens at ``address``; 'auto' is left to Ray."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RayConnectError(f"no Ray cluster answers at {address} within {timeout_s:g}s: {exc}") from exc


@contextlib.contextmanager
def ray_session(config: RayConfig | None = None) -> Iterator[RaySessionInfo]:
    """Connect to (or start) Ray for the duration of the block; yield a ``RaySessionInfo``
    (``address``, ``started``, ``reused``, ``resources``).

    ``config=None`` means ``RayConfig.from_env()``: the worker's Ray if it set one, else local.
    If Ray is already initialised in this process the existing connection is used and left
    open. Otherwise the session calls ``ray.shutdown()`` on exit, which also stops a local Ray
    it started. Raises RayAuthError (missing/unreadable/rejected token; not retryable) or
    RayConnectError (nothing listening at the address; retryable), never hangs past Ray's
    bounded connect retries. Auth variables it set (and ``RAY_ADDRESS``, hidden while a Ray of its
    own runs) are restored on exit, also on error.
    """
    import ray

    config = config or RayConfig.from_env()
    if ray.is_initialized():
        yield {"address": None, "started": False, "reused": True, "resources": ray.cluster_resources()}
        return
    saved = {name: os.environ.get(name) for name in _SAVED_VARS}
    try:
        if config.auth_mode == "disabled":
            os.environ["RAY_AUTH_MODE"] = "disabled"
            token = None
        else:
            token = config.resolve_token()
            if token is None and config.address is not None:
                raise RayAuthError(
                    f"Ray cluster {config.address} uses token auth but no token is configured: set "
                    "RayConfig.auth_token / auth_token_path or the RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH "
                    "environment variable (or auth_mode='disabled' for a cluster without auth)"
                )
            # A local Ray of our own gets a throwaway token, so nothing lands in ~/.ray.
            token = token or secrets.token_hex(32)
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = token
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        _reset_ray_auth_cache()
        kwargs: dict[str, Any] = {"log_to_driver": config.log_to_driver, "runtime_env": dict(config.runtime_env or {})}
        if config.address is None:
            # "local": a new Ray, whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster say (module docstring).
            if (other := os.environ.pop("RAY_ADDRESS", None)):
                log.warning("ray: ignoring RAY_ADDRESS=%s: RayConfig(address=None) starts a Ray of its own; "
                            "set RayConfig.address to join a cluster", other)
            ray.init(address="local", num_cpus=config.num_cpus or os.cpu_count(), include_dashboard=False,
                     object_store_memory=config.object_store_memory, **kwargs)
        else:
            _probe(config.address, config.connect_timeout_s)
            try:
                ray.init(address=config.address, **kwargs)
            except ray.exceptions.AuthenticationError as exc:
                raise RayAuthError(f"Ray cluster {config.address} rejected the connection: {exc.message}") from exc
            except ConnectionError as exc:
                raise RayAuthError(
                    f"Ray cluster {config.address} is listening but refused this driver; the auth token "
                    f"(auth_mode={config.auth_mode!r}) is wrong or the cluster uses a different auth mode"
                ) from exc
        log.info("ray: %s %s", "started local Ray" if config.address is None else "joined", config.address or "")
        yield {"address": config.address, "started": config.address is None, "reused": False,
               "resources": ray.cluster_resources()}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset_ray_auth_cache()
