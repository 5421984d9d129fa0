"""Evaluate a GJSON path the way KEDA's ``metrics-api`` scaler evaluates ``valueLocation``.

KEDA reads the value with tidwall/gjson: dot-separated keys, ``\\.`` for a literal dot in a key
(``queues.team\\.gpu.workers``), a number for an array index. Only that subset is implemented:
enough to check, in a test, that the path the chart writes finds the number the scaler serves.
"""

from __future__ import annotations

from typing import Any


def split_path(path: str) -> list[str]:
    """``a.b\\.c.d`` -> ``["a", "b.c", "d"]``."""
    parts, cur, escaped = [], "", False
    for ch in path:
        if escaped:
            cur, escaped = cur + ch, False
        elif ch == "\\":
            escaped = True
        elif ch == ".":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def gjson_get(doc: Any, path: str) -> Any:
    """The value at ``path``, or raise ``KeyError`` (KEDA: "valueLocation must point to value of type number")."""
    node = doc
    for key in split_path(path):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise KeyError(f"{path!r}: no {key!r}")
    return node


def keda_metric_value(doc: Any, path: str) -> float:
    """The number KEDA takes from ``doc`` at ``valueLocation`` ``path`` (numbers, or strings of numbers)."""
    value = gjson_get(doc, path)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{path!r} points to {value!r}, not a number")
    return float(value)
