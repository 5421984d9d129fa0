"""Worker settings: one frozen, validated object built once from flags, environment and a TOML file.

Precedence is flags > ``OUTPOST_*`` environment variables > the TOML file (``--config`` or
``OUTPOST_CONFIG``) > defaults. Every setting has the same name everywhere: ``poll_interval_s``
is ``--poll-interval-s`` on the command line, ``OUTPOST_POLL_INTERVAL_S`` in the environment and
``poll_interval_s`` in the file. A bad value raises :class:`ConfigError` naming the setting,
the value and what is allowed, before anything starts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.preflight import airflow_jwt_secret
from airflow_outpost.worker.units import parse_duration

ENV_PREFIX = "OUTPOST_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,256}$")
CRASH_POLICIES = ("stop", "adopt")
TRIGGER_MODES = ("central", "local")
# An existing Ray cluster: "auto", "host:port" or "ray://host:port" (IPv6 hosts in brackets).
_RAY_ADDRESS_RE = re.compile(r"^(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$")


# A clean stop, after the drain timeout and the kill grace: how long tasks killed with SIGKILL get
# to have their failure reported, and how long the final reports (jobs, then "offline") may take.
AFTER_KILL_WAIT_S = 10.0
OFFLINE_FLUSH_S = 30.0
# After a preemption notice the machine goes away on the cloud's clock (30 s on some clouds):
# the grace and both waits shrink so that drain (15 s by default) + 15 s fits.
PREEMPTION_KILL_GRACE_S = 5.0
PREEMPTION_WAIT_S = 5.0

# Environment variables that authenticate the *worker*; task processes and helpers never see them.
WORKER_CREDENTIAL_ENV = ("OUTPOST_JWT_SECRET", "OUTPOST_JWT_SECRET_FILE", "AIRFLOW__API_AUTH__JWT_SECRET",
                         "OUTPOST_TOKEN_FILE", "OUTPOST_OIDC_CLIENT_SECRET_FILE", "OUTPOST_CLIENT_KEY")


def without_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the worker's own credentials."""
    return {k: v for k, v in env.items() if k not in WORKER_CREDENTIAL_ENV}


def _default_home() -> Path:
    return Path(os.environ.get("OUTPOST_HOME", Path.home() / ".outpost"))


@dataclass(frozen=True)
class Settings:
    """Everything the worker needs to know, validated. See README "Configuration" for each field."""

    api_url: str
    name: str = field(default_factory=socket.gethostname)
    queues: tuple[str, ...] | None = None
    concurrency: int = 4
    # Adaptive polling: after work or a freed slot the worker polls again at once, for 0.5 s after
    # one of its tasks reported a final state every 0.4 x poll_min_interval_s (not below 20 ms),
    # then backs off with jitter from poll_min_interval_s up to poll_interval_s while nothing arrives.
    poll_interval_s: float = 2.0
    poll_min_interval_s: float = 0.1
    heartbeat_interval_s: float = 10.0
    execution_api_url: str | None = None
    log_folder: Path = field(default_factory=lambda: _default_home() / "logs")
    # A group that may read task logs (a log shipper's): the log folder is given to it, setgid, so
    # every log (0640) and folder (0750) under it carries it. None: the worker's own group.
    log_group: str | None = None
    # Run task processes as this OS user (through sudo, as Airflow's run_as_user does), so a DAG
    # author cannot read the worker's secret, config, state or process. Needs log_group: a group
    # both users are in, through which the task user writes its logs and reaches the region store
    # and the model service (README "Trust boundary").
    task_user: str | None = None
    state_folder: Path = field(default_factory=lambda: _default_home() / "state")
    dags_folder: Path | None = None
    push_logs: bool = False
    push_log_chunk_size: int = 512_000
    drain_timeout_s: float = 300.0
    kill_grace_s: float = 10.0
    startup_timeout_s: float = 15.0
    request_timeout_s: float = 30.0
    # How long the gateway holds a task's request while the control plane is unreachable.
    outage_hold_s: float = 900.0
    # Settle time before a task start is confirmed (0 = off). Only needed when the control plane's
    # metadata DB is SQLite, where the server can hand one job to several workers (README).
    confirm_start_s: float = 0.0
    # What a crashed worker's task processes do: "stop" (they die with it; a restart reports their
    # jobs failed) or "adopt" (they run on; a restart with the same state folder takes them over).
    crash_policy: str = "stop"
    # Where a task that defers waits: "central" (the control plane's triggerer, stock behaviour) or
    # "local" (a trigger runner on this worker; README "In-region triggers").
    triggers: str = "central"
    max_local_triggers: int = 1000
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_secret_file: Path | None = None
    jwt_issuer: str | None = None
    team_name: str | None = None
    prewarm: int = 1
    preload: tuple[str, ...] = ()  # modules the zygote imports before it forks tasks
    # Opt task processes in to the kernel's samepage merging (README "Memory merging"; Linux 6.4+).
    memory_merge: bool = False
    edge_provider_version: str | None = None
    # Deploying: health/metrics endpoint, GPU slots, idle exit, preemption, cost budgets.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 = no health/metrics server
    gpu_queues: tuple[str, ...] = ("gpu*",)
    gpus: tuple[str, ...] | None = None  # None = detect (NVML, torch); () = none
    exit_when_idle_s: float = 0.0  # 0 = never
    # The exit code after exit_when_idle_s: 3 tells a wrapper "idle, power off"; a Kubernetes Job
    # counts only 0 as success, so the Helm chart's ephemeral (KEDA ScaledJob) workers set 0.
    idle_exit_code: int = 3
    preemption_notice_file: Path | None = None
    preemption_drain_timeout_s: float = 15.0
    warm_models: tuple[str, ...] = ()
    # Keep embedding models loaded across tasks in a worker-owned model service (runners extra).
    model_service: bool = True
    model_idle_s: float = 600.0
    # Ray for tasks (README "Warm Ray"): None = each task starts its own on demand; "local" = the
    # worker starts and owns a persistent local head; "auto"/"host:port"/"ray://host:port" = an
    # existing cluster, passed to tasks. The rest apply to "local" or to a cluster, as named.
    ray: str | None = None
    ray_num_cpus: int | None = None  # local: None = all cores
    ray_num_gpus: int | None = None  # local: None = 0 (GPUs stay with the worker's GPU slots)
    # local: the head's node IP, the address Ray gives every node and driver for it; None = 127.0.0.1
    # (this host only). An address of a network interface lets other hosts join with `ray start`.
    ray_node_ip_address: str | None = None
    ray_auth_token_file: Path | None = None  # cluster: its token, given to tasks as RAY_AUTH_TOKEN_PATH
    ray_keep_warm_s: float | None = None  # None = model_idle_s
    budgets: tuple[tuple[str, float], ...] = ()  # (("queue:gpu", 7200.0), ("dag:train", 1800.0))
    # Data sovereignty (README "Data sovereignty"): what may leave the region, and how we authenticate.
    region: str = "default"
    region_local_xcom: bool = True
    xcom_threshold_bytes: int = 65_536
    max_xcom_bytes: int = 1_048_576  # 0 = no limit
    # Caps of the other bodies a task writes to the control plane (0 = no cap of its own). The
    # gateway reads no request body longer than the largest cap (README "Data sovereignty").
    max_variable_bytes: int = 1_048_576
    max_asset_event_bytes: int = 1_048_576  # a task state update, with its asset events' extras
    max_dagrun_conf_bytes: int = 1_048_576  # a triggered DAG run, with its conf
    max_hitl_bytes: int = 1_048_576  # a human-in-the-loop response
    logs: str | None = None  # none | redacted | full; unset: "full" with push_logs, else "none"
    redacted_log_max_bytes: int = 262_144
    redact_patterns: tuple[str, ...] = ()
    secrets: str = "local-first"  # local-only | local-first | central
    rendered_fields: str = "local"  # local: a task's rendered arguments stay in the region | full
    store_root: Path | None = None
    token_file: Path | None = None
    oidc_token_url: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret_file: Path | None = None
    oidc_audience: str | None = None
    oidc_scope: str | None = None
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        # nan passes every range check below (each comparison is False) and inf waits forever:
        # refused first, naming the setting, whatever its range.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            pairs = value if f.name == "budgets" else [(f.name, value)]
            for name, number in pairs:
                if isinstance(number, float) and not math.isfinite(number):
                    raise ConfigError(f.name if f.name != "budgets" else f"budgets {name}", number,
                                      "a finite number (nan and inf are not durations or amounts)")
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
        if self.log_group is not None:
            group_id("log_group", self.log_group)
        if self.task_user is not None:
            _validate_task_user(self.task_user, self.log_group)
        _positive_int("push_log_chunk_size", self.push_log_chunk_size, maximum=10_000_000)
        for module in self.preload:
            if not _MODULE.fullmatch(module):
                raise ConfigError("preload", module, "dotted Python module names, comma-separated, e.g. "
                                                     "airflow.providers.common.sql.hooks.sql,pyarrow")
        if self.prewarm not in (0, 1) or isinstance(self.prewarm, bool):
            raise ConfigError("prewarm", self.prewarm, "1 (fork tasks from a pre-imported zygote) or 0 (fresh interpreter per task)")
        for name in ("poll_interval_s", "poll_min_interval_s", "heartbeat_interval_s", "request_timeout_s", "startup_timeout_s"):
            _positive_float(name, getattr(self, name))
        if not isinstance(self.confirm_start_s, (int, float)) or isinstance(self.confirm_start_s, bool) \
                or not 0 <= self.confirm_start_s <= 10:
            raise ConfigError("confirm_start_s", self.confirm_start_s, "a number of seconds from 0 (off) to 10")
        if not isinstance(self.outage_hold_s, (int, float)) or isinstance(self.outage_hold_s, bool) \
                or not 0 <= self.outage_hold_s <= 86_400:
            raise ConfigError("outage_hold_s", self.outage_hold_s, "a duration from 0 (fail at once) to 24h, e.g. 900 or 15m")
        if self.crash_policy not in CRASH_POLICIES:
            raise ConfigError("crash_policy", self.crash_policy,
                              "stop (task processes die with a crashed worker and are reported failed) or adopt "
                              "(they run on and a restart with the same state folder takes them over)")
        if self.triggers not in TRIGGER_MODES:
            raise ConfigError("triggers", self.triggers, "central (deferred tasks wait on the control plane's triggerer) or "
                                                         "local (they wait on this worker)")
        _positive_int("max_local_triggers", self.max_local_triggers, maximum=100_000)
        for name in ("drain_timeout_s", "kill_grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(name, value, "a number of seconds >= 0")
        if self.poll_min_interval_s > self.poll_interval_s:
            raise ConfigError("poll_min_interval_s", self.poll_min_interval_s, f"must not exceed poll_interval_s ({self.poll_interval_s})")
        _validate_deploy(self)
        _validate_ray(self)
        _validate_sovereignty(self)
        if self.jwt_secret_file is not None and not Path(self.jwt_secret_file).is_file():
            raise ConfigError("jwt_secret_file", str(self.jwt_secret_file), "must be a readable file holding [api_auth] jwt_secret")

    @property
    def execution_api(self) -> str:
        """The Task Execution API URL task processes talk to."""
        return self.execution_api_url or f"{self.api_url}/execution/"

    @property
    def edge_api(self) -> str:
        return f"{self.api_url}/edge_worker/v1/"

    @property
    def log_policy(self) -> str:
        """What leaves with task logs: ``none``, ``redacted`` or ``full``."""
        return self.logs or ("full" if self.push_logs else "none")

    @property
    def region_store(self) -> Path:
        """Root of the region-local store (XCom values that must not leave the region)."""
        return self.store_root or self.state_folder / "store"

    def stop_budget_s(self, *, preempted: bool = False) -> float:
        """The longest a clean stop can take, from SIGTERM to exit: drain, kill grace, the wait
        after SIGKILL and the final-report flush. A supervisor's stop timeout (systemd
        ``TimeoutStopSec``, Kubernetes ``terminationGracePeriodSeconds``, ``docker stop -t``) must
        be at least this, or it kills the worker before every final state is reported."""
        if preempted:
            drain = min(self.preemption_drain_timeout_s, self.drain_timeout_s)
            return drain + min(self.kill_grace_s, PREEMPTION_KILL_GRACE_S) + 2 * PREEMPTION_WAIT_S
        return self.drain_timeout_s + self.kill_grace_s + AFTER_KILL_WAIT_S + OFFLINE_FLUSH_S

    def secret(self) -> str | None:
        """The shared JWT secret, read from ``jwt_secret_file`` when given (re-read on each call)."""
        if self.jwt_secret_file is not None:
            return Path(self.jwt_secret_file).read_text().strip()
        return self.jwt_secret


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


# -- parsing ----------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _convert(name: str, raw: Any) -> Any:
    """Turn a string (env/flag) or TOML value into the field's type, or raise ConfigError."""
    f = _FIELDS[name]
    kind = str(f.type)
    if raw is None:
        return None
    try:
        if name == "redact_patterns":  # one regex per line (a TOML list is kept as is)
            return tuple(str(p) for p in raw) if isinstance(raw, list) else tuple(p for p in str(raw).splitlines() if p)
        if name in ("queues", "gpu_queues", "gpus", "warm_models", "preload"):
            items = raw if isinstance(raw, list) else [q.strip() for q in str(raw).split(",")]
            items = [str(q) for q in items if q != ""]
            if name == "gpus" and [i.lower() for i in items] == ["none"]:
                items = []
            return tuple(items) if items else tuple()
        if name == "budgets":
            return _parse_budgets(raw)
        if name.endswith("_s") and kind.startswith("float") and isinstance(raw, str):
            try:
                return float(raw)  # a plain number: range checks below say what is allowed
            except ValueError:
                return parse_duration(raw)  # "15m", "1h30m"
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
        if name == "budgets":
            expected = "comma-separated queue:<name>=<duration> or dag:<id>=<duration>, e.g. queue:gpu=2h"
        elif name.endswith("_s") and kind.startswith("float"):
            expected = "a number of seconds or a duration such as 15m or 1h"
        raise ConfigError(name, raw, expected) from None


def _parse_budgets(raw: Any) -> tuple[tuple[str, float], ...]:
    """``{"queue:gpu": "2h"}`` (TOML) or ``"queue:gpu=2h,dag:train=30m"`` (env/flag) -> sorted pairs."""
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        pairs = []
        for item in str(raw).split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(item)
            pairs.append((key, value))
    out: dict[str, float] = {}
    for key, value in pairs:
        try:
            out[str(key).strip()] = parse_duration(value)
        except ValueError:
            raise ConfigError("budgets", f"{key}={value}", "a duration per UTC day such as 2h, 30m or 900") from None
    return tuple(sorted(out.items()))


# Settings that give the worker a credential; without any, Airflow's own configuration is read.
_CREDENTIAL_SETTINGS = ("jwt_secret", "jwt_secret_file", "token_file", "oidc_token_url")


def _read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a TOML file: top-level keys, a ``[worker]`` table, or both (the table wins),
    plus tables that are settings themselves (``[budgets]``) wherever they stand."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "the config file does not exist") from None
    except PermissionError:
        raise ConfigError("config", str(path), "the config file is not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    table = data.pop("worker", {})
    if not isinstance(table, dict):
        raise ConfigError("worker", table, f"in {path}: [worker] must be a table of settings")
    return {**data, **table}


def collect_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The converted values of every setting given by flags, env or the file (flags win over the
    environment, which wins over the file), without defaults or cross-checks: what commands that
    only need one setting (``outpost status``: the state folder) read."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = {}
    if path:
        data = _read_config_file(path)
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
    return values


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build :class:`Settings` from flags (already parsed, ``None`` = not given), env and a file.

    With no ``OUTPOST_*`` credential at all, the control plane's ``[api_auth] jwt_secret`` is taken
    from Airflow's own configuration, as the stock ``airflow edge worker`` does:
    ``AIRFLOW__API_AUTH__JWT_SECRET``, else ``[api_auth] jwt_secret`` in ``$AIRFLOW_CONFIG`` or
    ``$AIRFLOW_HOME/airflow.cfg`` (``~/airflow/airflow.cfg``).
    """
    env = os.environ if env is None else env
    values = collect_settings(flags, env, config_file)
    if not any(values.get(k) for k in _CREDENTIAL_SETTINGS):
        secret = airflow_jwt_secret(env)
        if secret:
            values["jwt_secret"] = secret
    if "api_url" not in values:
        raise ConfigError("api_url", None, "required: pass --api-url, set OUTPOST_API_URL, or api_url in the config file")
    try:
        return Settings(**values)
    except TypeError as exc:  # a None for a required-typed field
        raise ConfigError("settings", values, str(exc)) from exc
