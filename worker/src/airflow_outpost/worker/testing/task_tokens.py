"""Task tokens for tests that talk to the egress gateway as a task process would.

The gateway forwards a request only with the token of a try the worker runs
(:mod:`airflow_outpost.worker.egress.admission`). :func:`task_token` makes an unsigned token for a
subject (the gateway reads, never verifies, it); :class:`TaskTokens`, an ``httpx.Auth``, admits
the try a request is about (the task instance in its path, else ``default``) and sends its token.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Generator
from typing import Protocol

import httpx

_TI_PATH = re.compile(r"/task-instances/([^/]+)/")


def task_token(sub: str) -> str:
    """An unsigned JWT whose subject is ``sub``."""
    def part(obj: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'sub': sub})}.c2ln"


class _Admits(Protocol):
    def admit(self, subject: str, label: str) -> None: ...


class TaskTokens(httpx.Auth):
    """Authorise each request as the try it is about; a request with its own header keeps it."""

    def __init__(self, egress: _Admits, default: str = "0190f0f0-0000-7000-8000-000000000001") -> None:
        self._egress = egress
        self._default = default

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        m = _TI_PATH.search(request.url.path + "/")
        subject = m.group(1) if m else self._default
        self._egress.admit(subject, subject)
        request.headers.setdefault("Authorization", f"Bearer {task_token(subject)}")
        yield request
