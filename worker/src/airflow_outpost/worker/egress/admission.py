"""Who may use the egress gateway, and for what: the checks made before a request is forwarded.

The gateway forwards the worker's Task Execution API only, with the worker's TLS client
certificate, so it must not become a way into the rest of the control plane or a way to act for
a task the caller is not:

* the path must start with this run's secret prefix, ``/<32 random hex>/execution/``
  (:func:`new_prefix`), which only task processes are given (in their Execution API URL): a
  process that merely finds the loopback port gets 404 before any token is looked at;
* the path must lie under that prefix and carry no dot segment, raw or
  percent-encoded (``..``, ``%2e%2e``, ``.%2E``, ``%252e%252e``, ``..%2f``): httpx resolves dot
  segments, so ``/execution/../edge_worker/v1/...`` would otherwise reach the Edge API. Refused 400;
* every request carries a task token (``Authorization: Bearer <JWT>``) whose subject is a try (or
  callback) this worker runs now. The worker cannot verify the signature (the control plane holds
  the key, :mod:`airflow_outpost.worker.edge.tokens`), and need not: the server verifies it. The
  check keeps a process on this host from borrowing the worker's client certificate for a try it
  was never handed. Refused 401 (no readable token) or 403 (not a try of this worker);
* a request about one task instance's run, state or heartbeat, the ones the worker itself acts on
  (kept deferrals, noted states, refused starts), must carry that task instance's own token. 403.

Pure: no I/O. :func:`check` returns a :class:`~airflow_outpost.worker.egress.policy.Refusal` or ``None``.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Container
from urllib.parse import unquote

from airflow_outpost.worker.edge.tokens import claims
from airflow_outpost.worker.egress.policy import Refusal

PREFIX = "/execution/"  # the public part of the prefix; ledger rows name endpoints under it
_SECRET_PREFIX = re.compile(r"^/[0-9a-f]{32}/execution/$")
_SECRET_IN_TEXT = re.compile(r"/[0-9a-f]{32}/execution/")
# Paths whose task instance the worker acts on; its id must be the token's subject.
_OWN_TI = re.compile(r"^task-instances/([^/]+)/(?:run|state|heartbeat)$")
_DECODE_ROUNDS = 4  # %252e needs two; more than a few layers of encoding is refused outright


def new_prefix() -> str:
    """A fresh secret path prefix for the gateway: ``/<32 random hex>/execution/`` (128 bits)."""
    return f"/{secrets.token_hex(16)}{PREFIX}"


def is_prefix(value: object) -> bool:
    """Whether ``value`` is a prefix :func:`new_prefix` could have made."""
    return isinstance(value, str) and _SECRET_PREFIX.match(value) is not None


def masked(text: str) -> str:
    """``text`` with any gateway prefix's secret part hidden (for logs and decision reasons)."""
    return _SECRET_IN_TEXT.sub("/<prefix>" + PREFIX, text)


def public_path(raw_path: str, prefix: str) -> str:
    """``raw_path`` as ledger rows name it: the secret part of ``prefix`` replaced by :data:`PREFIX`."""
    return PREFIX + raw_path[len(prefix):] if raw_path.startswith(prefix) else raw_path


def has_dot_segment(path: str) -> bool:
    """Whether ``path``, raw or after (repeated) percent-decoding, has a ``.`` or ``..`` segment.

    Backslashes count as separators too (some servers treat them so). A path still encoded after
    a few rounds of decoding counts as having one: nothing legitimate is encoded that deep.
    """
    for _ in range(_DECODE_ROUNDS):
        if any(seg in (".", "..") for seg in re.split(r"[/\\]", path)):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


def token_subject(authorization: str | None) -> str | None:
    """The ``sub`` claim of a ``Bearer`` task token, unverified; ``None`` if there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    sub = (claims(token.strip()) or {}).get("sub")
    return str(sub) if isinstance(sub, str) and sub else None


def check(raw_path: str, method: str, authorization: str | None, running: Container[str], *,
          prefix: str) -> Refusal | None:
    """Why the gateway must not forward this request, or ``None`` if it may go on to the policy.

    ``raw_path``: the request target's path as received (still percent-encoded);
    ``running``: the token subjects of the tries and callbacks this worker runs now;
    ``prefix``: this run's secret prefix (:func:`new_prefix`).
    """
    head = raw_path[:len(prefix)].encode("latin-1", "replace")
    if not hmac.compare_digest(head, prefix.encode()):  # compared in constant time: it is a secret
        return Refusal(rule="gateway-prefix", kind="other", size=0, status=404,
                       message="outpost gateway: not found (task processes are given the path to use)")
    if has_dot_segment(raw_path):
        return Refusal(rule="execution-api-only", kind="other", size=0, status=400,
                       message="outpost gateway: only Execution API paths without dot segments are forwarded")
    sub = token_subject(authorization)
    if sub is None:
        return Refusal(rule="task-token", kind="other", size=0, status=401,
                       message="outpost gateway: a task token (Authorization: Bearer <JWT>) is required")
    if sub not in running:
        return Refusal(rule="task-token", kind="other", size=0, status=403,
                       message="outpost gateway: the token's subject is not a try this worker runs")
    own = _OWN_TI.match(unquote(raw_path[len(prefix):])) if method in ("PATCH", "PUT") else None
    if own is not None and own.group(1) != sub:
        return Refusal(rule="task-token", kind="state", size=0, status=403,
                       message="outpost gateway: a try's run, state and heartbeat take only that try's own token")
    return None
