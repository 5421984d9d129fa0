"""Worker settings: one frozen, validated object built once from flags, environment and a TOML file.

Precedence is flags > ``OUTPOST_*`` environment variables > the TOML file (``--config`` or
``OUTPOST_CONFIG``) > defaults. Every setting has the same name everywhere: ``poll_interval_s``
is ``--poll-interval-s`` on the command line, ``OUTPOST_POLL_INTERVAL_S`` in the environment and
``poll_interval_s`` in the file. A bad value raises :class:`ConfigError` naming the setting,
the value and what is allowed, before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from worker.errors import ConfigError

ENV_PREFIX = "OUTPOST_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")


def _default_home() -> Path:
    return Path(os.environ.get("OUTPOST_HOME", Path.home() / ".outpost"))


@dataclass(frozen=True)
class Settings:
    """Everything the worker needs to know, validated. See README "Configuration" for each field."""

    api_url: str
    name: str = field(default_factory=socket.gethostname)
    queues: tuple[str, ...] | None = None
    concurrency: int = 4
    # Adaptive polling: after work or a freed slot the worker polls again at once, then backs
    # off with jitter from poll_min_interval_s up to poll_interval_s while nothing arrives.
    poll_interval_s: float = 2.0
    poll_min_interval_s: float = 0.1
    heartbeat_interval_s: float = 10.0
    execution_api_url: str | None = None
    log_folder: Path = field(default_factory=lambda: _default_home() / "logs")
    state_folder: Path = field(default_factory=lambda: _default_home() / "state")
    dags_folder: Path | None = None
    push_logs: bool = False
    push_log_chunk_size: int = 512_000
    drain_timeout_s: float = 300.0
    kill_grace_s: float = 10.0
    startup_timeout_s: float = 15.0
    request_timeout_s: float = 30.0
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_secret_file: Path | None = None
    jwt_issuer: str | None = None
    team_name: str | None = None
    prewarm: int = 1
    edge_provider_version: str | None = None

    def __post_init__(self) -> None:
        api = urlsplit(self.api_url or "")
        if api.scheme not in ("http", "https") or not api.netloc:
            raise ConfigError("api_url", self.api_url, "must be an http(s) URL of the Airflow API server, e.g. http://host:8080")
        # Accept the stock worker's [edge] api_url form too, but keep only the server root.
        root = re.sub(r"/edge_worker/v1(/rpcapi)?/?$", "", self.api_url.rstrip("/"))
        object.__setattr__(self, "api_url", root)
        if self.execution_api_url is not None:
            ex = urlsplit(self.execution_api_url)
            if ex.scheme not in ("http", "https") or not ex.netloc:
                raise ConfigError("execution_api_url", self.execution_api_url, "must be an http(s) URL")
        if not _NAME_RE.match(self.name or ""):
            raise ConfigError("name", self.name, "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
        if self.queues is not None:
            if not self.queues:
                raise ConfigError("queues", ",".join(self.queues), "give at least one queue, or leave unset for all queues")
            for q in self.queues:
                if not _QUEUE_RE.match(q):
                    raise ConfigError("queues", q, "queue names are 1-256 characters of letters, digits, '_', '.', ':' or '-'")
        _positive_int("concurrency", self.concurrency, maximum=1024)
        _positive_int("push_log_chunk_size", self.push_log_chunk_size, maximum=10_000_000)
        if not isinstance(self.prewarm, int) or not 0 <= self.prewarm <= 64:
            raise ConfigError("prewarm", self.prewarm, "an integer from 0 to 64")
        for name in ("poll_interval_s", "poll_min_interval_s", "heartbeat_interval_s", "request_timeout_s", "startup_timeout_s"):
            _positive_float(name, getattr(self, name))
        for name in ("drain_timeout_s", "kill_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(name, value, "a number of seconds >= 0")
        if self.poll_min_interval_s > self.poll_interval_s:
            raise ConfigError("poll_min_interval_s", self.poll_min_interval_s, f"must not exceed poll_interval_s ({self.poll_interval_s})")
        if self.jwt_secret_file is not None and not Path(self.jwt_secret_file).is_file():
            raise ConfigError("jwt_secret_file", str(self.jwt_secret_file), "must be a readable file holding [api_auth] jwt_secret")

    @property
    def execution_api(self) -> str:
        """The Task Execution API URL task processes talk to."""
        return self.execution_api_url or f"{self.api_url}/execution/"

    @property
    def edge_api(self) -> str:
        return f"{self.api_url}/edge_worker/v1/"

    def secret(self) -> str | None:
        """The shared JWT secret, read from ``jwt_secret_file`` when given (re-read on each call)."""
        if self.jwt_secret_file is not None:
            return Path(self.jwt_secret_file).read_text().strip()
        return self.jwt_secret


def _positive_int(name: str, value: Any, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ConfigError(name, value, f"an integer from 1 to {maximum}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86_400:
        raise ConfigError(name, value, "a number of seconds > 0 and <= 86400")


# -- parsing ----------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, raw: Any) -> Any:
    """Turn a string (env/flag) or TOML value into the field's type, or raise ConfigError."""
    f = _FIELDS[name]
    kind = str(f.type)
    if raw is None:
        return None
    try:
        if name == "queues":
            items = raw if isinstance(raw, list) else [q.strip() for q in str(raw).split(",")]
            items = [q for q in items if q]
            return tuple(items) if items else tuple()
        if kind.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if "Path" in kind:
            return Path(os.path.expanduser(str(raw)))
        return str(raw)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind.split(" ")[0], "a value")
        raise ConfigError(name, raw, expected) from None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build :class:`Settings` from flags (already parsed, ``None`` = not given), env and a file."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config", str(path), "the config file does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
        data = data.get("worker", data)  # a [worker] table or top-level keys
        for key, raw in data.items():
            if key not in _FIELDS:
                raise ConfigError(key, raw, f"unknown setting in {path}; known: {', '.join(sorted(_FIELDS))}")
            values[key] = _convert(key, raw)
    for key in _FIELDS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None and raw != "":
            values[key] = _convert(key, raw)
    for key, raw in flags.items():
        if key not in _FIELDS:
            raise ConfigError(key, raw, "unknown setting")
        values[key] = _convert(key, raw)
    if "api_url" not in values:
        raise ConfigError("api_url", None, "required: pass --api-url, set OUTPOST_API_URL, or api_url in the config file")
    try:
        return Settings(**values)
    except TypeError as exc:  # a None for a required-typed field
        raise ConfigError("settings", values, str(exc)) from exc
