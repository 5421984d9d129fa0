"""Exceptions raised by the outpost worker.

Hierarchy::

    OutpostError                      root; ``retryable`` says whether trying again can help
    ├── ConfigError                   a setting has a bad value (names setting, value, allowed)
    ├── ServerError                   the control plane answered, but not with success
    │   ├── TransientServerError      5xx / 429: retryable
    │   ├── AuthError                 401 / 403: credentials or clock are wrong
    │   ├── DuplicateWorkerError      409 on register: another worker holds this name
    │   ├── VersionMismatchError      400 on register/heartbeat: server refuses our versions
    │   └── NotFoundError             404: e.g. worker unknown to the server, Edge API off
    ├── ConnectError                  no answer at all (refused, DNS, timeout, TLS): retryable
    ├── CredentialError               our own credential cannot be read (missing or empty secret/token file)
    ├── JobRejected                   a fetched job is malformed or hostile; never retried
    ├── LaunchTimeoutError            a task process did not start in time; its job is failed here
    └── StartupError                  the worker cannot join the control plane (the CLI prints it)
"""

from __future__ import annotations


class OutpostError(Exception):
    """Root of every error the worker raises on purpose."""

    retryable: bool = False


class ConfigError(OutpostError):
    """A configuration value is invalid."""

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        self.setting, self.value, self.allowed = setting, value, allowed
        super().__init__(f"invalid setting {setting}={value!r}: {allowed}")


class ServerError(OutpostError):
    """The control plane answered with an error status."""

    def __init__(self, status: int, method: str, path: str, detail: str) -> None:
        self.status, self.method, self.path, self.detail = status, method, path, detail
        super().__init__(f"{method} {path} -> HTTP {status}: {detail}")


class TransientServerError(ServerError):
    retryable = True


class AuthError(ServerError):
    pass


class DuplicateWorkerError(ServerError):
    pass


class VersionMismatchError(ServerError):
    pass


class NotFoundError(ServerError):
    pass


class ConnectError(OutpostError):
    """The control plane could not be reached at all."""

    retryable = True


class CredentialError(OutpostError):
    """The worker's own credential cannot be read now (missing or empty secret or token file).

    Not ``retryable`` for one operation (startup fails with it at once), but a rotation that
    rewrites the file in place (``printf > file`` truncates first) causes it for a moment: what
    must not be lost (the outbox) retries it with backoff."""


class JobRejected(OutpostError):
    """A fetched job failed validation; it is reported failed and never run."""


class LaunchTimeoutError(OutpostError):
    """A task process was not started within the launcher's start timeout (the zygote is stuck or
    overloaded). The job is reported failed (and retried elsewhere by its retries); a process that
    starts later anyway is killed before it runs the task."""


class StartupError(OutpostError):
    """The worker cannot join the control plane; the message is the one line the CLI prints."""
