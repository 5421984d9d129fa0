"""The checks of :class:`~airflow_outpost.worker.config.Settings` that span values or look at this
host (users, groups, interfaces, files): run once the values have their types, each failure a
:class:`ConfigError` naming the setting, the value and what is allowed."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_outpost.worker.errors import ConfigError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
CRASH_POLICIES = ("stop", "adopt")
TRIGGER_MODES = ("central", "local")
# An existing Ray cluster: "auto", "host:port" or "ray://host:port" (IPv6 hosts in brackets).
_RAY_ADDRESS_RE = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$")


def check_settings(s: Settings) -> None:
    """Every check across values and against this host; normalises api_url, ray_node_ip_address and
    ray_keep_warm_s in place (the model is frozen to everyone else)."""
    api = urlsplit(s.api_url or "")
    if api.scheme not in ("http", "https") or not api.netloc:
        raise ConfigError("api_url", s.api_url, "must be an http(s) URL of the Airflow API server, e.g. http://host:8080")
    # Accept the stock worker's [edge] api_url form too, but keep only the server root.
    root = re.sub(r"/edge_worker/v1(/rpcapi)?/?$", "", s.api_url.rstrip("/"))
    object.__setattr__(s, "api_url", root)
    if s.execution_api_url is not None:
        ex = urlsplit(s.execution_api_url)
        if ex.scheme not in ("http", "https") or not ex.netloc:
            raise ConfigError("execution_api_url", s.execution_api_url, "must be an http(s) URL")
    if not _NAME_RE.match(s.name or ""):
        raise ConfigError("name", s.name, "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit")
    if s.queues is not None:
        if not s.queues:
            raise ConfigError("queues", ",".join(s.queues), "give at least one queue, or leave unset for all queues")
        for q in s.queues:
            if not _QUEUE_RE.match(q):
                raise ConfigError("queues", q, "queue names are 1-256 characters of letters, digits, '_', '.', ':' or '-'")
    _positive_int("concurrency", s.concurrency, maximum=1024)
    if s.log_group is not None:
        group_id("log_group", s.log_group)
    if s.task_user is not None:
        _validate_task_user(s.task_user, s.log_group)
    _positive_int("push_log_chunk_size", s.push_log_chunk_size, maximum=10_000_000)
    for module in s.preload:
        if not _MODULE.fullmatch(module):
            raise ConfigError("preload", module, "dotted Python module names, comma-separated, e.g. "
                                                 "airflow.providers.common.sql.hooks.sql,pyarrow")
    if s.prewarm not in (0, 1) or isinstance(s.prewarm, bool):
        raise ConfigError("prewarm", s.prewarm, "1 (fork tasks from a pre-imported zygote) or 0 (fresh interpreter per task)")
    for name in ("poll_interval_s", "poll_min_interval_s", "heartbeat_interval_s", "request_timeout_s", "startup_timeout_s"):
        _positive_float(name, getattr(s, name))
    if not isinstance(s.confirm_start_s, (int, float)) or isinstance(s.confirm_start_s, bool) \
            or not 0 <= s.confirm_start_s <= 10:
        raise ConfigError("confirm_start_s", s.confirm_start_s, "a number of seconds from 0 (off) to 10")
    if not isinstance(s.outage_hold_s, (int, float)) or isinstance(s.outage_hold_s, bool) \
            or not 0 <= s.outage_hold_s <= 86_400:
        raise ConfigError("outage_hold_s", s.outage_hold_s, "a duration from 0 (fail at once) to 24h, e.g. 900 or 15m")
    if s.crash_policy not in CRASH_POLICIES:
        raise ConfigError("crash_policy", s.crash_policy,
                          "stop (task processes die with a crashed worker and are reported failed) or adopt "
                          "(they run on and a restart with the same state folder takes them over)")
    if s.triggers not in TRIGGER_MODES:
        raise ConfigError("triggers", s.triggers, "central (deferred tasks wait on the control plane's triggerer) or "
                                                 "local (they wait on this worker)")
    _positive_int("max_local_triggers", s.max_local_triggers, maximum=100_000)
    for name in ("drain_timeout_s", "kill_grace_s"):
        value = getattr(s, name)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(name, value, "a number of seconds >= 0")
    if s.poll_min_interval_s > s.poll_interval_s:
        raise ConfigError("poll_min_interval_s", s.poll_min_interval_s, f"must not exceed poll_interval_s ({s.poll_interval_s})")
    _validate_deploy(s)
    _validate_ray(s)
    _validate_sovereignty(s)
    if s.jwt_secret_file is not None and not Path(s.jwt_secret_file).is_file():
        raise ConfigError("jwt_secret_file", str(s.jwt_secret_file), "must be a readable file holding [api_auth] jwt_secret")


def group_id(name: str, value: str) -> int:
    """The gid of a group name or number that exists on this host, else ConfigError naming ``name``."""
    import grp

    try:
        return grp.getgrgid(int(value)).gr_gid if value.isdigit() else grp.getgrnam(value).gr_gid
    except (KeyError, OverflowError):
        raise ConfigError(name, value, "must be a group name or gid that exists on this host (getent group)") from None


def task_user_ids(name: str) -> tuple[int, int]:
    """(uid, primary gid) of the user ``name`` (a name or a uid), else ConfigError naming task_user."""
    import pwd

    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise ConfigError("task_user", name, "must be a user name or uid that exists on this host (getent passwd)") from None
    return pw.pw_uid, pw.pw_gid


def _validate_task_user(name: str, log_group: str | None) -> None:
    import grp
    import pwd

    uid, gid = task_user_ids(name)
    if log_group is None:
        raise ConfigError("task_user", name, "needs log_group: a group both the worker's user and the task user are in "
                                             "(the task user writes its logs and reaches the region store through it)")
    shared = grp.getgrgid(group_id("log_group", log_group))
    if gid != shared.gr_gid and pwd.getpwuid(uid).pw_name not in shared.gr_mem:
        raise ConfigError("task_user", name, f"must be a member of log_group {shared.gr_name} "
                                             f"(usermod -aG {shared.gr_name} {pwd.getpwuid(uid).pw_name})")


def _validate_deploy(s: Settings) -> None:
    if not isinstance(s.metrics_port, int) or isinstance(s.metrics_port, bool) or not 0 <= s.metrics_port <= 65535:
        raise ConfigError("metrics_port", s.metrics_port, "a TCP port from 1 to 65535, or 0 to turn the health/metrics server off")
    if not s.metrics_host:
        raise ConfigError("metrics_host", s.metrics_host, "an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
    for pattern in s.gpu_queues:
        if not re.match(r"^[A-Za-z0-9_.:*?\[\]-]{1,256}$", pattern):
            raise ConfigError("gpu_queues", pattern, "comma-separated queue names or glob patterns such as gpu*")
    for dev in s.gpus or ():
        if not re.match(r"^(\d{1,3}|(GPU|MIG)-[A-Za-z0-9/-]{1,100})$", dev):
            raise ConfigError("gpus", dev, "comma-separated device indexes (0,1,2,3) or GPU-/MIG- UUIDs")
    if s.gpus is not None and len(set(s.gpus)) != len(s.gpus):
        raise ConfigError("gpus", ",".join(s.gpus), "each device once")
    if not isinstance(s.model_idle_s, (int, float)) or isinstance(s.model_idle_s, bool) or s.model_idle_s <= 0:
        raise ConfigError("model_idle_s", s.model_idle_s, "a duration > 0 such as 600 or 10m")
    for name in ("exit_when_idle_s", "preemption_drain_timeout_s"):
        value = getattr(s, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(name, value, "a duration >= 0 such as 900, 15m or 1h")
    if not isinstance(s.idle_exit_code, int) or isinstance(s.idle_exit_code, bool) or not 0 <= s.idle_exit_code <= 125:
        raise ConfigError("idle_exit_code", s.idle_exit_code, "an integer from 0 to 125 (0: a Kubernetes Job's success)")
    for model in s.warm_models:
        if not model or len(model) > 500:
            raise ConfigError("warm_models", model, "comma-separated model names or paths")
    for key, seconds in s.budgets:
        kind, _, target = key.partition(":")
        if kind not in ("queue", "dag") or not target:
            raise ConfigError("budgets", key, "keys are queue:<queue> or dag:<dag_id>, e.g. queue:gpu=2h")
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ConfigError("budgets", f"{key}={seconds}", "a duration > 0 per UTC day, e.g. 2h or 30m")
    if s.queues is None and any(k.startswith("queue:") for k, _ in s.budgets):
        raise ConfigError("budgets", ",".join(k for k, _ in s.budgets),
                          "queue budgets need an explicit --queues list (a worker serving all queues cannot leave one out)")


def _validate_ray(s: Settings) -> None:
    if s.ray is not None and s.ray not in ("local", "auto") and not _valid_ray_address(s.ray):
        raise ConfigError("ray", s.ray, "local (the worker starts and owns a Ray head), or an existing cluster: auto, "
                                        "host:port or ray://host:port (leave unset for a Ray per task)")
    if s.ray_num_cpus is not None:
        _positive_int("ray_num_cpus", s.ray_num_cpus, maximum=4096)
    if s.ray_num_gpus is not None and (not isinstance(s.ray_num_gpus, int) or isinstance(s.ray_num_gpus, bool)
                                       or not 0 <= s.ray_num_gpus <= 256):
        raise ConfigError("ray_num_gpus", s.ray_num_gpus, "an integer from 0 to 256")
    for name in ("ray_num_cpus", "ray_num_gpus"):
        if getattr(s, name) is not None and s.ray != "local":
            raise ConfigError(name, getattr(s, name), "only applies with ray = local (the worker's own Ray head); "
                                                       "an existing cluster has its own resources")
    if s.ray_node_ip_address is not None:
        if s.ray != "local":
            raise ConfigError("ray_node_ip_address", s.ray_node_ip_address,
                              "only applies with ray = local (the worker's own Ray head); an existing cluster "
                              "has its own addresses")
        object.__setattr__(s, "ray_node_ip_address", _host_ipv4("ray_node_ip_address", s.ray_node_ip_address))
    if s.ray_auth_token_file is not None:
        if s.ray in (None, "local"):
            raise ConfigError("ray_auth_token_file", str(s.ray_auth_token_file),
                              "only for an existing cluster (ray = auto, host:port or ray://host:port); "
                              "with ray = local the worker makes its own token")
        if not Path(s.ray_auth_token_file).is_file():
            raise ConfigError("ray_auth_token_file", str(s.ray_auth_token_file), "must be a readable file holding the cluster's token")
    if s.ray_keep_warm_s is not None:
        if s.ray is None:
            raise ConfigError("ray_keep_warm_s", s.ray_keep_warm_s,
                              "only applies with ray set (a Ray started per task ends with the task)")
        if not isinstance(s.ray_keep_warm_s, (int, float)) or isinstance(s.ray_keep_warm_s, bool) \
                or not 0 <= s.ray_keep_warm_s <= 7 * 86_400:
            raise ConfigError("ray_keep_warm_s", s.ray_keep_warm_s, "a duration from 0 to 7 days, e.g. 600 or 10m")
    else:
        object.__setattr__(s, "ray_keep_warm_s", float(s.model_idle_s))


def _host_ipv4(name: str, value: Any) -> str:
    """``value`` as an IPv4 address that this host has (it can bind it), else ConfigError."""
    allowed = ("an IPv4 address of this host that the region's other hosts reach it at, e.g. 10.0.0.5 "
               "(default 127.0.0.1: this host only)")
    try:
        ip = ipaddress.IPv4Address(str(value).strip())
    except ValueError:
        raise ConfigError(name, value, allowed) from None
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        # Ray hands this address to every node and driver as where to reach the head: it must be one.
        raise ConfigError(name, value, allowed + "; not 0.0.0.0, a broadcast or a multicast address")
    with socket.socket() as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError as exc:
            raise ConfigError(name, value, f"{allowed}; this host has no interface with it ({exc.strerror})") from None
    return str(ip)


def _valid_ray_address(address: str) -> bool:
    match = _RAY_ADDRESS_RE.match(address)
    return match is not None and 1 <= int(match.group(3)) <= 65535


def _validate_sovereignty(s: Settings) -> None:
    if not isinstance(s.region, str) or not _NAME_RE.match(s.region):
        raise ConfigError("region", s.region, "1-64 characters: letters, digits, '.', '_' or '-'")
    _positive_int("xcom_threshold_bytes", s.xcom_threshold_bytes, maximum=1 << 30)
    _positive_int("redacted_log_max_bytes", s.redacted_log_max_bytes, maximum=1 << 30)
    for name in ("max_xcom_bytes", "max_variable_bytes", "max_asset_event_bytes", "max_dagrun_conf_bytes", "max_hitl_bytes"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 31:
            raise ConfigError(name, value, "bytes from 0 (no limit) to 2147483648")
    if s.rendered_fields not in ("local", "full"):
        raise ConfigError("rendered_fields", s.rendered_fields, "local (kept in the region) or full (sent, as Airflow does)")
    if s.logs not in (None, "none", "redacted", "full"):
        raise ConfigError("logs", s.logs, "one of none, redacted, full")
    if s.secrets not in ("local-only", "local-first", "central"):
        raise ConfigError("secrets", s.secrets, "one of local-only, local-first, central")
    for pattern in s.redact_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError("redact_patterns", pattern, f"a Python regular expression ({exc})") from None
    if s.oidc_token_url is not None:
        if urlsplit(s.oidc_token_url).scheme not in ("http", "https"):
            raise ConfigError("oidc_token_url", s.oidc_token_url, "an http(s) URL of the OAuth2 token endpoint")
        if not s.oidc_client_id or s.oidc_client_secret_file is None:
            raise ConfigError("oidc_token_url", s.oidc_token_url, "needs oidc_client_id and oidc_client_secret_file too")
        if s.token_file is not None:
            raise ConfigError("token_file", str(s.token_file), "use either token_file or oidc_token_url, not both")
    for name in ("ca_bundle", "client_cert", "client_key", "oidc_client_secret_file"):
        value = getattr(s, name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(name, str(value), "must be a readable file")
    if s.client_key is not None and s.client_cert is None:
        raise ConfigError("client_key", str(s.client_key), "needs client_cert (the certificate for this key)")


def _positive_int(name: str, value: Any, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ConfigError(name, value, f"an integer from 1 to {maximum}")


def _positive_float(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86_400:
        raise ConfigError(name, value, "a number of seconds > 0 and <= 86400")
