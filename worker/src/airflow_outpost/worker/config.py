"""Worker settings: one frozen, validated object built once from flags, environment and a TOML file.

Precedence is flags > ``OUTPOST_*`` environment variables > the TOML file (``--config`` or
``OUTPOST_CONFIG``) > defaults. Every setting has the same name everywhere: ``poll_interval_s``
is ``--poll-interval-s`` on the command line, ``OUTPOST_POLL_INTERVAL_S`` in the environment and
``poll_interval_s`` in the file. A bad value raises :class:`ConfigError` naming the setting,
the value and what is allowed, before anything starts.

The model is a ``pydantic-settings`` one: its environment and TOML sources read the environment and
the file, :mod:`.config_types` turns strings into each setting's type and :mod:`.config_checks` checks
values against each other and this host.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Self

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from airflow_outpost.worker.config_checks import (  # noqa: F401 (group_id, task_user_ids: public here)
    CRASH_POLICIES,
    TRIGGER_MODES,
    check_settings,
    group_id,
    task_user_ids,
)
from airflow_outpost.worker.config_types import (
    Budgets,
    Count,
    Devices,
    FilePath,
    Flag,
    Names,
    OptCount,
    OptNames,
    OptPath,
    OptSeconds,
    Patterns,
    Seconds,
    config_error,
)
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.preflight import airflow_jwt_secret

ENV_PREFIX = "OUTPOST_"

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
# Settings whose value no error, repr or log shows.
SECRET_SETTINGS = ("jwt_secret",)


def without_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the worker's own credentials."""
    return {k: v for k, v in env.items() if k not in WORKER_CREDENTIAL_ENV}


def _default_home() -> Path:
    return Path(os.environ.get("OUTPOST_HOME", Path.home() / ".outpost"))


class Settings(BaseSettings):
    """Everything the worker needs to know, validated. See README "Configuration" for each field.

    Built by :func:`load_settings`; constructed directly it takes keyword values only (no environment
    or file is read)."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True, hide_input_in_errors=True,
        env_prefix=ENV_PREFIX, env_ignore_empty=True, enable_decoding=False, case_sensitive=False,
    )

    api_url: str
    name: str = Field(default_factory=socket.gethostname)
    queues: OptNames = None
    concurrency: Count = 4
    # Adaptive polling: after work or a freed slot the worker polls again at once, for 0.5 s after
    # one of its tasks reported a final state every 0.4 x poll_min_interval_s (not below 20 ms),
    # then backs off with jitter from poll_min_interval_s up to poll_interval_s while nothing arrives.
    poll_interval_s: Seconds = 2.0
    poll_min_interval_s: Seconds = 0.1
    heartbeat_interval_s: Seconds = 10.0
    execution_api_url: str | None = None
    log_folder: FilePath = Field(default_factory=lambda: _default_home() / "logs")
    # A group that may read task logs (a log shipper's): the log folder is given to it, setgid, so
    # every log (0640) and folder (0750) under it carries it. None: the worker's own group.
    log_group: str | None = None
    # Run task processes as this OS user (through sudo, as Airflow's run_as_user does), so a DAG
    # author cannot read the worker's secret, config, state or process. Needs log_group: a group
    # both users are in, through which the task user writes its logs and reaches the region store
    # and the model service (README "Trust boundary").
    task_user: str | None = None
    state_folder: FilePath = Field(default_factory=lambda: _default_home() / "state")
    dags_folder: OptPath = None
    push_logs: Flag = False
    push_log_chunk_size: Count = 512_000
    drain_timeout_s: Seconds = 300.0
    kill_grace_s: Seconds = 10.0
    startup_timeout_s: Seconds = 15.0
    request_timeout_s: Seconds = 30.0
    # How long the gateway holds a task's request while the control plane is unreachable.
    outage_hold_s: Seconds = 900.0
    # Settle time before a task start is confirmed (0 = off). Only needed when the control plane's
    # metadata DB is SQLite, where the server can hand one job to several workers (README).
    confirm_start_s: Seconds = 0.0
    # What a crashed worker's task processes do: "stop" (they die with it; a restart reports their
    # jobs failed) or "adopt" (they run on; a restart with the same state folder takes them over).
    crash_policy: str = "stop"
    # Where a task that defers waits: "central" (the control plane's triggerer, stock behaviour) or
    # "local" (a trigger runner on this worker; README "In-region triggers").
    triggers: str = "central"
    max_local_triggers: Count = 1000
    jwt_secret: SecretStr | None = Field(default=None, repr=False)
    jwt_secret_file: OptPath = None
    jwt_issuer: str | None = None
    team_name: str | None = None
    prewarm: Count = 1
    preload: Names = ()  # modules the zygote imports before it forks tasks
    # Opt task processes in to the kernel's samepage merging (README "Memory merging"; Linux 6.4+).
    memory_merge: Flag = False
    edge_provider_version: str | None = None
    # Deploying: health/metrics endpoint, GPU slots, idle exit, preemption, cost budgets.
    metrics_host: str = "127.0.0.1"
    metrics_port: Count = 9464  # 0 = no health/metrics server
    gpu_queues: Names = ("gpu*",)
    gpus: Devices = None  # None = detect (NVML, torch); () = none
    exit_when_idle_s: Seconds = 0.0  # 0 = never
    # The exit code after exit_when_idle_s: 3 tells a wrapper "idle, power off"; a Kubernetes Job
    # counts only 0 as success, so the Helm chart's ephemeral (KEDA ScaledJob) workers set 0.
    idle_exit_code: Count = 3
    preemption_notice_file: OptPath = None
    preemption_drain_timeout_s: Seconds = 15.0
    warm_models: Names = ()
    # Keep embedding models loaded across tasks in a worker-owned model service (runners extra).
    model_service: Flag = True
    model_idle_s: Seconds = 600.0
    # Ray for tasks (README "Warm Ray"): None = each task starts its own on demand; "local" = the
    # worker starts and owns a persistent local head; "auto"/"host:port"/"ray://host:port" = an
    # existing cluster, passed to tasks. The rest apply to "local" or to a cluster, as named.
    ray: str | None = None
    ray_num_cpus: OptCount = None  # local: None = all cores
    ray_num_gpus: OptCount = None  # local: None = 0 (GPUs stay with the worker's GPU slots)
    # local: the head's node IP, the address Ray gives every node and driver for it; None = 127.0.0.1
    # (this host only). An address of a network interface lets other hosts join with `ray start`.
    ray_node_ip_address: str | None = None
    ray_auth_token_file: OptPath = None  # cluster: its token, given to tasks as RAY_AUTH_TOKEN_PATH
    ray_keep_warm_s: OptSeconds = None  # None = model_idle_s
    budgets: Budgets = ()  # (("queue:gpu", 7200.0), ("dag:train", 1800.0))
    # Data sovereignty (README "Data sovereignty"): what may leave the region, and how we authenticate.
    region: str = "default"
    region_local_xcom: Flag = True
    xcom_threshold_bytes: Count = 65_536
    max_xcom_bytes: Count = 1_048_576  # 0 = no limit
    # Caps of the other bodies a task writes to the control plane (0 = no cap of its own). The
    # gateway reads no request body longer than the largest cap (README "Data sovereignty").
    max_variable_bytes: Count = 1_048_576
    max_asset_event_bytes: Count = 1_048_576  # a task state update, with its asset events' extras
    max_dagrun_conf_bytes: Count = 1_048_576  # a triggered DAG run, with its conf
    max_hitl_bytes: Count = 1_048_576  # a human-in-the-loop response
    logs: str | None = None  # none | redacted | full; unset: "full" with push_logs, else "none"
    redacted_log_max_bytes: Count = 262_144
    redact_patterns: Patterns = ()
    secrets: str = "local-first"  # local-only | local-first | central
    rendered_fields: str = "local"  # local: a task's rendered arguments stay in the region | full
    store_root: OptPath = None
    token_file: OptPath = None
    oidc_token_url: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret_file: OptPath = None
    oidc_audience: str | None = None
    oidc_scope: str | None = None
    ca_bundle: OptPath = None
    client_cert: OptPath = None
    client_key: OptPath = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() reads the given environment and file itself (so a test's env={} is all
        # there is): the model only takes what it is handed.
        return (init_settings,)

    @model_validator(mode="after")
    def _checked(self) -> Self:
        check_settings(self)
        return self

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
        return self.jwt_secret.get_secret_value() if self.jwt_secret is not None else None


# -- sources ----------------------------------------------------------------------------------

_FIELDS: dict[str, FieldInfo] = Settings.model_fields
# Settings that give the worker a credential; without any, Airflow's own configuration is read.
_CREDENTIAL_SETTINGS = ("jwt_secret", "jwt_secret_file", "token_file", "oidc_token_url")


class _EnvSource(EnvSettingsSource):
    """``OUTPOST_*`` variables of a given mapping (``os.environ`` unless a caller passes one)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _TomlSource(TomlConfigSettingsSource):
    """The settings in a TOML file: top-level keys, a ``[worker]`` table, or both (the table wins),
    plus tables that are settings themselves (``[budgets]``) wherever they stand."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | os.PathLike[str]) -> None:
        self._path = str(path)
        if not Path(path).is_file():
            raise ConfigError("config", self._path, "the config file does not exist")
        super().__init__(settings_cls, toml_file=Path(path))

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except PermissionError:
            raise ConfigError("config", self._path, "the config file is not readable by this user") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", self._path, f"not valid TOML: {exc}") from None
        table = data.pop("worker", {})
        if not isinstance(table, dict):
            raise ConfigError("worker", table, f"in {self._path}: [worker] must be a table of settings")
        values = {**data, **table}
        for key, raw in values.items():
            if key not in _FIELDS:
                raise ConfigError(key, raw, f"unknown setting in {self._path}; known: {', '.join(sorted(_FIELDS))}")
        return values


@cache
def _adapter(name: str) -> TypeAdapter[Any]:
    """One setting's type, validated on its own (no cross-checks)."""
    return TypeAdapter(_FIELDS[name].rebuild_annotation(), config={"allow_inf_nan": False, "coerce_numbers_to_str": True})


def _convert(name: str, raw: Any) -> Any:
    """Turn a string (env/flag) or TOML value into the setting's type, or raise ConfigError."""
    try:
        return _adapter(name).validate_python(raw)
    except ValidationError as exc:
        err = config_error(exc, SECRET_SETTINGS)
        raise ConfigError(name if err.setting == "settings" else err.setting, err.value, err.allowed) from None


def _raw_settings(
    flags: Mapping[str, Any] | None, env: Mapping[str, str], config_file: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """The values given by the file, the environment and the flags, in that order of precedence
    (later wins), as given: strings from env and flags, typed values from the file."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    for key, raw in flags.items():
        if key not in _FIELDS:
            raise ConfigError(key, raw, "unknown setting")
    values: dict[str, Any] = dict(_TomlSource(Settings, path)()) if path else {}
    values.update(_EnvSource(Settings, env)())
    values.update(flags)
    return values


def collect_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The converted values of every setting given by flags, env or the file (flags win over the
    environment, which wins over the file), without defaults or cross-checks: what commands that
    only need one setting (``outpost status``: the state folder) read."""
    values = _raw_settings(flags, os.environ if env is None else env, config_file)
    return {key: _convert(key, raw) for key, raw in values.items()}


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
    values = _raw_settings(flags, env, config_file)
    if not any(values.get(k) for k in _CREDENTIAL_SETTINGS):
        secret = airflow_jwt_secret(env)
        if secret:
            values["jwt_secret"] = secret
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise config_error(exc, SECRET_SETTINGS) from None
