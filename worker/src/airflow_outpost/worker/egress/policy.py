"""Egress policy: what may leave the region, decided per request.

Every request to the control plane is classified into a *kind* (``heartbeat``, ``state``,
``xcom``, ``variable``, ``connection``, ``logs``, ...) from its path and method, and checked
against the worker's policy (region, the per-kind byte caps, ``secrets``, ``logs``). Heartbeats
always pass; every body a task writes is capped by its kind's cap (:data:`CAPS`), and the gateway
reads no body longer than the largest cap (:meth:`Policy.cap_for` before the body is read,
:meth:`Policy.check` after). A refusal is a :class:`Refusal`: the rule, the kind and the size, and a
message for the task, which the gateway returns as an HTTP error the Task SDK surfaces in the
task's log (and records in the ledger). Rendered template fields (``rendered_fields=local``, the
default) are *kept*: answered with success and not sent, since only the UI displays them.

Pure: no I/O; the gateway and the Edge client call :meth:`Policy.check`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings

# Execution API paths (relative to .../execution/), first segment -> kind.
_EXECUTION_KINDS = {
    "xcoms": "xcom",
    "variables": "variable",
    "connections": "connection",
    "assets": "asset",
    "asset-events": "asset",
    "dag-runs": "dagrun",
    "task-reschedules": "state",
    "hitlDetails": "hitl",
    "store": "store",
}
# Edge API paths (relative to .../edge_worker/v1/).
_EDGE_KINDS = (("worker/", "worker"), ("jobs/fetch", "job-fetch"), ("jobs/state", "state"), ("logs/", "logs"))
_TI_HEARTBEAT = re.compile(r"^task-instances/[^/]+/heartbeat$")
_TI_RTIF = re.compile(r"^task-instances/[^/]+/rtif$")


def classify(path: str, method: str) -> str:
    """The egress kind of a request; ``path`` is relative to the Execution or Edge API root."""
    path = path.lstrip("/")
    for prefix, kind in _EDGE_KINDS:
        if path.startswith(prefix):
            return kind
    if _TI_HEARTBEAT.match(path):
        return "heartbeat"
    if _TI_RTIF.match(path):
        return "rendered-fields"  # rendered template fields: a task's arguments, cut at 4 KiB by Airflow
    head = path.split("/", 1)[0]
    if head == "task-instances":
        return "state"
    return _EXECUTION_KINDS.get(head, "other")


# Each write kind's cap: kind -> (setting, what it caps). Setting 0 = no cap of its own (then the
# gateway's ceiling, MAX_BODY_BYTES, bounds it).
CAPS = {
    "xcom": ("max_xcom_bytes", "XCom"),
    "variable": ("max_variable_bytes", "Variable"),
    "state": ("max_asset_event_bytes", "task state update with its asset events and their extras"),
    "dagrun": ("max_dagrun_conf_bytes", "DAG run trigger with its conf"),
    "hitl": ("max_hitl_bytes", "human-in-the-loop response"),
}
# The most the gateway reads of any request when a cap is 0 (no limit), and the bound of bodies no
# cap names (rendered fields, asset look-ups, ...) is the largest cap.
MAX_BODY_BYTES = 512 * 1024 * 1024
_WRITES = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class Refusal:
    """Why a request may not leave: HTTP ``status`` for the task, ``rule`` and ``message``."""

    rule: str
    kind: str
    size: int
    message: str
    status: int = 403
    # Answer the task with success but keep the data: for payloads Airflow only displays.
    keep_local: bool = False


@dataclass(frozen=True)
class Policy:
    """The egress rules of one worker. Build it with :meth:`from_settings`."""

    region: str = "default"
    max_xcom_bytes: int = 1_048_576  # 0 = no limit
    max_variable_bytes: int = 1_048_576
    max_asset_event_bytes: int = 1_048_576
    max_dagrun_conf_bytes: int = 1_048_576
    max_hitl_bytes: int = 1_048_576
    secrets: str = "local-first"
    logs: str = "none"
    region_local_xcom: bool = True
    rendered_fields: str = "local"

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(region=s.region, max_xcom_bytes=s.max_xcom_bytes, max_variable_bytes=s.max_variable_bytes,
                   max_asset_event_bytes=s.max_asset_event_bytes, max_dagrun_conf_bytes=s.max_dagrun_conf_bytes,
                   max_hitl_bytes=s.max_hitl_bytes, secrets=s.secrets, logs=s.log_policy,
                   region_local_xcom=s.region_local_xcom, rendered_fields=s.rendered_fields)

    @property
    def max_body_bytes(self) -> int:
        """The most the gateway reads of any request body: the largest cap (``MAX_BODY_BYTES`` for 0)."""
        return max(getattr(self, setting) or MAX_BODY_BYTES for setting, _ in CAPS.values())

    def cap_for(self, kind: str, method: str) -> tuple[str, int]:
        """The setting that caps a request of ``kind`` and its limit in bytes. A write of a capped
        kind has its own cap; anything else is bounded by the largest (``max_body_bytes``)."""
        if method.upper() in _WRITES and kind in CAPS:
            setting = CAPS[kind][0]
            if limit := getattr(self, setting):
                return setting, limit
        return "max_body_bytes", self.max_body_bytes

    def over_cap(self, kind: str, method: str, path: str, size: int, *, said: str = "has") -> Refusal | None:
        """A 413 :class:`Refusal` if a body of ``size`` bytes is over its cap, else ``None``.
        ``said``: how ``size`` is known, for the message: ``has`` (read whole), ``announces``
        (``Content-Length``, the body unread) or ``runs past`` (a chunked body, read up to the cap)."""
        setting, limit = self.cap_for(kind, method)
        if size <= limit:
            return None
        name = path.rstrip("/").rsplit("/", 1)[-1]
        what = CAPS[kind][1] if setting != "max_body_bytes" else f"{kind} request"
        if setting == "max_body_bytes":
            how = "the largest of the worker's max_*_bytes caps; nothing bigger is read"
        elif kind == "xcom":
            how = ("values above xcom_threshold_bytes stay in the region" if self.region_local_xcom
                   else "turn region_local_xcom on to keep large values in the region")
        else:
            how = f"raise {setting} on the worker to allow more"
        return Refusal(rule=setting, kind=kind, size=size, status=413,
                       message=(f"outpost egress policy (region {self.region}): rule {setting} refuses {what} "
                                f"{name!r}: its body {said} {size:,} bytes; the limit is {limit:,} bytes sent to "
                                f"the control plane ({how})"))

    def check(self, kind: str, method: str, path: str, size: int) -> Refusal | None:
        """Return a :class:`Refusal` if the request may not leave the region, else ``None``."""
        method = method.upper()
        if (refusal := self.over_cap(kind, method, path, size)) is not None:
            return refusal
        if kind in ("variable", "connection") and self.secrets == "local-only" and method == "GET":
            name = path.rstrip("/").rsplit("/", 1)[-1]
            return Refusal(
                rule="secrets=local-only", kind=kind, size=size,
                message=(f"outpost egress policy (region {self.region}): rule secrets=local-only refuses fetching "
                         f"{kind} {name!r} from the control plane; define it on the worker (AIRFLOW_CONN_*/"
                         f"AIRFLOW_VAR_* or a local secrets backend)"),
            )
        if kind == "rendered-fields" and self.rendered_fields == "local":
            # A task's rendered arguments (real data, up to 4 KiB per field) are only shown in the
            # UI's "Rendered Template" tab: keep them and tell the Task SDK they were stored.
            return Refusal(rule="rendered_fields=local", kind=kind, size=size, status=201, keep_local=True,
                           message=f"outpost egress policy (region {self.region}): rendered template fields stay in the region")
        if kind == "logs" and self.logs == "none":
            return Refusal(rule="logs=none", kind=kind, size=size,
                           message=f"outpost egress policy (region {self.region}): rule logs=none keeps task logs local")
        return None
