"""``outpost scaler`` settings: one frozen, validated object from flags and ``OUTPOST_SCALER_*``.

Precedence is flags > environment > defaults, as for the worker (:mod:`..config`). A bad value
raises :class:`ConfigError` naming the setting, the value and what is allowed, before anything
starts; the CLI turns it into exit code 2.

The scaler reads the control plane's public REST API with a *read-only API credential*: a bearer
token in ``token_file`` (re-read when it changes, so something else may refresh it), or a
``username`` + ``password_file`` exchanged at the auth manager's ``/auth/token``. It never takes the
workers' ``jwt_secret``: that key signs Execution API tokens for any task.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.units import parse_duration

ENV_PREFIX = "OUTPOST_SCALER_"
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
MAX_CONCURRENCY = 10_000


@dataclass(frozen=True)
class ScalerSettings:
    """What ``outpost scaler`` needs. See README "Autoscaling and Helm"."""

    api_url: str
    # Queues always reported (0 when empty), so a ScaledObject's valueLocation never misses.
    # Queues with queued or running tasks are reported too, listed or not.
    queues: tuple[str, ...] = ()
    # Slots per worker when a request names none (`?concurrency=N` overrides per ScaledObject).
    concurrency: int = 4
    host: str = "127.0.0.1"
    port: int = 9465
    # At most one round of REST calls per refresh_interval_s, however many ScaledObjects ask.
    refresh_interval_s: float = 10.0
    # After a failed refresh, values this fresh are still served; older -> 503 for KEDA.
    stale_after_s: float = 30.0
    request_timeout_s: float = 10.0
    token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.api_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError("api_url", self.api_url, "an http(s) URL of the Airflow API server, e.g. http://airflow:8080")
        for q in self.queues:
            if not _QUEUE_RE.match(q):
                raise ConfigError("queues", q, "queue names are 1-256 characters of letters, digits, '_', '.', ':' or '-'")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) \
                or not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError("concurrency", self.concurrency, f"an integer from 1 to {MAX_CONCURRENCY}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError("port", self.port, "a TCP port from 1 to 65535")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError("host", self.host, "an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
        limits = {"refresh_interval_s": (0.0, 3600.0), "stale_after_s": (0.0, 86400.0), "request_timeout_s": (0.1, 300.0)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ConfigError(name, value, f"a number of seconds from {low:g} to {high:g}, or a duration such as 30s")
        if self.token_file and (self.username or self.password_file):
            raise ConfigError("token_file", str(self.token_file), "use either token_file or username + password_file, not both")
        if bool(self.username) != bool(self.password_file):
            raise ConfigError("username" if not self.username else "password_file",
                              self.username or None, "username and password_file go together")
        if not (self.token_file or self.username):
            raise ConfigError("token_file", None, "required: a read-only API credential, token_file or "
                              "username + password_file (never the workers' jwt_secret)")
        for name in ("token_file", "password_file", "ca_bundle"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(name, str(path), "must be a readable file")


_FIELDS = {f.name: f for f in dataclasses.fields(ScalerSettings)}


def _convert(name: str, raw: Any) -> Any:
    kind = str(_FIELDS[name].type)
    try:
        if name == "queues":
            return tuple(q.strip() for q in str(raw).split(",") if q.strip())
        if name.endswith("_s"):
            try:
                return float(raw)
            except ValueError:
                return parse_duration(raw)
        if kind.startswith("int"):
            return int(raw)
        if "Path" in kind:
            return Path(os.path.expanduser(str(raw)))
        return str(raw)
    except (TypeError, ValueError):
        expected = "a duration such as 10, 10s or 1m" if name.endswith("_s") else "an integer"
        raise ConfigError(name, raw, expected) from None


def load_scaler_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> ScalerSettings:
    """Build :class:`ScalerSettings` from parsed flags (``None`` = not given) and the environment."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for key in _FIELDS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw:
            values[key] = _convert(key, raw)
    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(key, raw, "unknown setting")
        values[key] = _convert(key, raw)
    if "api_url" not in values:
        raise ConfigError("api_url", None, "required: pass --api-url or set OUTPOST_SCALER_API_URL")
    return ScalerSettings(**values)


def setting_names() -> tuple[str, ...]:
    """Every setting, in declaration order (the CLI makes one flag of each)."""
    return tuple(_FIELDS)
