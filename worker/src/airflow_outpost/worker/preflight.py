"""Checks ``outpost worker`` runs on its settings before it starts anything, and the stock worker's
credential fallback.

A setting that cannot work (no credential, a secret file this user cannot read, a state or log
folder it cannot write, ``memory_merge`` on a kernel without it) is a :class:`ConfigError`: exit 2
with one line naming the setting, before the health server, the zygote, the model service or Ray
start, so a supervisor does not restart a worker that can never run. A setting that works but
is unsafe (plain HTTP to another host) is a warning.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from airflow_outpost.worker.errors import ConfigError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings

log = logging.getLogger(__name__)


def airflow_jwt_secret(env: Mapping[str, str]) -> str | None:
    """``[api_auth] jwt_secret`` from Airflow's configuration as the stock worker reads it (env
    ``AIRFLOW__API_AUTH__JWT_SECRET``, else ``airflow.cfg``); None if neither has one."""
    if env.get("AIRFLOW__API_AUTH__JWT_SECRET"):
        return env["AIRFLOW__API_AUTH__JWT_SECRET"]
    cfg = env.get("AIRFLOW_CONFIG")
    if not cfg:
        home = env.get("AIRFLOW_HOME") or (str(Path(env["HOME"]) / "airflow") if env.get("HOME") else None)
        cfg = str(Path(home) / "airflow.cfg") if home else None
    if not cfg:
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(cfg, encoding="utf-8")
    except (OSError, configparser.Error):
        return None
    value = parser.get("api_auth", "jwt_secret", fallback="").strip()
    return value or None


def require_credentials(s: Settings) -> None:
    """Raise ConfigError (exit 2 at start, before anything is started) if the worker has no way to
    authenticate, or its secret file cannot be read."""
    if not ((s.jwt_secret and s.jwt_secret.get_secret_value()) or s.jwt_secret_file or s.token_file or s.oidc_token_url):
        raise ConfigError("jwt_secret", None, "required: set OUTPOST_JWT_SECRET or OUTPOST_JWT_SECRET_FILE (the "
                          "control plane's [api_auth] jwt_secret), AIRFLOW__API_AUTH__JWT_SECRET or [api_auth] "
                          "jwt_secret in airflow.cfg, or an OIDC token (--token-file / --oidc-token-url)")
    for name in ("jwt_secret_file", "token_file", "oidc_client_secret_file"):
        path = getattr(s, name)
        if path is not None:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(name, str(path), f"must be a file this user can read ({exc.strerror})") from None


def require_writable(s: Settings) -> None:
    """Raise ConfigError if the state or log folder cannot be created or written by this user."""
    for name in ("state_folder", "log_folder"):
        folder = Path(getattr(s, name))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ConfigError(name, str(folder), f"must be a folder this user (uid {os.getuid()}) can create and "
                              f"write ({exc.strerror}); create it and give it to this user, or choose another") from None


def check_memory_merge(s: Settings) -> None:
    """With ``memory_merge``: raise ConfigError if this kernel cannot opt processes in to KSM, and
    warn (the worker still starts) if the host's ``ksmd`` is not running, as nothing is merged
    until it is."""
    if not s.memory_merge:
        return
    from airflow_outpost.worker.processes import memory_merge

    if (reason := memory_merge.unsupported_reason()) is not None:
        raise ConfigError("memory_merge", True, f"{reason}; leave memory_merge off on this host")
    if memory_merge.host_running() is not True:
        log.warning("memory_merge is on, but KSM is not running on this host (%s/run is not 1): task pages are "
                    "merged only once it is; as root: echo 1 > %s/run", memory_merge.KSM_SYSFS, memory_merge.KSM_SYSFS)


def _loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False


def plain_http_urls(s: Settings) -> list[tuple[str, str]]:
    """The (setting, URL) pairs that speak plain HTTP to a host other than this one."""
    found = []
    for name in ("api_url", "execution_api_url", "oidc_token_url"):
        url = getattr(s, name)
        if url and urlsplit(url).scheme == "http" and not _loopback(urlsplit(url).hostname or ""):
            found.append((name, url))
    return found


def warn_plain_http(s: Settings) -> None:
    """Warn for each setting that sends credentials in clear text over the network: the worker's
    token or OIDC client secret, tasks' tokens, XComs and (by policy) logs would be readable and
    forgeable on the way."""
    for name, url in plain_http_urls(s):
        log.warning("%s %s is plain http to a host that is not this one: the worker's credentials, task tokens "
                    "and task data cross the network unencrypted; use https", name, url)
