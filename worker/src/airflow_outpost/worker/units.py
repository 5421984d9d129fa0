"""Parsing of human-friendly durations: ``"15m"``, ``"1h30m"``, ``"900"``, ``"2.5s"``, ``"1d"``."""

from __future__ import annotations

import re

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(raw: object) -> float:
    """Return seconds for a number or a duration string; raise ``ValueError`` if it is neither.

    A bare number is seconds. A string is one or more ``<number><unit>`` parts with units
    s, m, h, d (``"1h30m"``). Negative values are refused.
    """
    if isinstance(raw, bool):
        raise ValueError(f"not a duration: {raw!r}")
    if isinstance(raw, (int, float)):
        if raw < 0:
            raise ValueError(f"negative duration: {raw!r}")
        return float(raw)
    text = str(raw).strip().lower().replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value < 0:
            raise ValueError(f"negative duration: {raw!r}")
        return value
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            raise ValueError(f"not a duration: {raw!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a duration: {raw!r}")
    return total


def format_duration(seconds: float) -> str:
    """``5400`` -> ``"1h30m"``; for log lines and heartbeat comments."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s and not h else "")
    return out
