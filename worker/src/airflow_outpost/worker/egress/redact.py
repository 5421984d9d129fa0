"""Redacted task logs: a size-capped copy with secrets masked, for ``logs = "redacted"``.

Masking uses Airflow's own secrets masker (the Task SDK's ``secrets_masker``), loaded with the
secrets this worker holds locally: passwords of ``AIRFLOW_CONN_*`` connections, values of
``AIRFLOW_VAR_*`` variables and environment variables whose names Airflow considers sensitive
(``*password*``, ``*secret*``, ``*token*``, ``*api_key*``, ...). On top of that, ``key=value`` and
``"key": "value"`` pairs with sensitive keys, and every match of the configured ``redact_patterns``,
become ``***``. Only whole lines are masked: a partial last line waits for the next chunk, so a
secret split across two reads is still caught. Each task's copy is capped at
``redacted_log_max_bytes``; a note marks the cut.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from airflow.sdk._shared.secrets_masker.secrets_masker import (
    DEFAULT_SENSITIVE_FIELDS,
    SecretsMasker,
    should_hide_value_for_key,
)

MASK = "***"
_MIN_SECRET_LEN = 5  # shorter values would mask ordinary words
# key=value / "key": "value" where the key holds one of Airflow's sensitive words.
_SENSITIVE = "|".join(sorted((re.escape(f) for f in DEFAULT_SENSITIVE_FIELDS), key=len, reverse=True))
_PAIR = re.compile(
    rf"""(?P<key>[\w.-]*(?:{_SENSITIVE})[\w.-]*)(?P<sep>\\?["']?\s*[:=]\s*\\?["']?)(?P<value>[^\s"'\\,;&]+)""",
    re.IGNORECASE)


def local_secrets(environ: Mapping[str, str]) -> Iterable[str]:
    """Secret values held by this worker's environment."""
    for name, value in environ.items():
        if not value or len(value) < _MIN_SECRET_LEN:
            continue
        if name.startswith("AIRFLOW_CONN_"):
            yield from _connection_secrets(value)
        elif name.startswith("AIRFLOW_VAR_") or should_hide_value_for_key(name):
            yield value


def _connection_secrets(value: str) -> Iterable[str]:
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return
        for key in ("password", "extra"):
            if isinstance(data.get(key), str) and len(data[key]) >= _MIN_SECRET_LEN:
                yield data[key]
        return
    password = urlsplit(value).password
    if password and len(password) >= _MIN_SECRET_LEN:
        yield unquote(password)
        yield password


class LogRedactor:
    """Masks and caps log text per task. One instance per worker; keyed by the job."""

    def __init__(self, patterns: Iterable[str], max_bytes: int, environ: Mapping[str, str] | None = None) -> None:
        self._masker = SecretsMasker()
        for secret in local_secrets(os.environ if environ is None else environ):
            self._masker.add_mask(secret)
        self._patterns = [re.compile(p) for p in patterns]
        self.max_bytes = max_bytes
        self._carry: dict[object, str] = {}
        self._sent: dict[object, int] = {}

    def mask(self, text: str) -> str:
        """Mask every secret this redactor knows of in ``text``."""
        text = str(self._masker.redact(text))  # a str in, a str out (the masker also walks containers)
        text = _PAIR.sub(self._mask_pair, text)
        for pattern in self._patterns:
            text = pattern.sub(MASK, text)
        return text

    @staticmethod
    def _mask_pair(m: re.Match[str]) -> str:
        return f"{m.group('key')}{m.group('sep')}{MASK}"

    def redact(self, key: object, text: str, final: bool) -> str:
        """Masked, capped text to push for ``key``; holds back a partial last line unless ``final``."""
        text = self._carry.pop(key, "") + text
        if not final:
            cut = text.rfind("\n") + 1
            text, rest = text[:cut], text[cut:]
            if rest:
                self._carry[key] = rest
        sent = self._sent.get(key, 0)
        out = self.mask(text) if text else ""
        if sent >= self.max_bytes:
            out = ""
        elif sent + len(out.encode()) > self.max_bytes:
            room = self.max_bytes - sent
            out = out.encode()[:room].decode(errors="ignore")
            out += f"\n[outpost: log copy cut at {self.max_bytes} bytes (logs=redacted); the full log stays on the worker]\n"
            sent = self.max_bytes
        else:
            sent += len(out.encode())
        if final:
            self._sent.pop(key, None)
            self._carry.pop(key, None)
        else:
            self._sent[key] = sent
        return out
