"""The value types of :class:`~airflow_outpost.worker.config.Settings`: how a flag, an environment
variable or a TOML value becomes a setting's type, and how pydantic's validation errors become one
:class:`ConfigError` naming the setting, the value and what is allowed.

Flags and environment variables are strings; a TOML file has typed values. Durations take seconds or
a unit (``"15m"``, ``"1h30m"``); lists are comma-separated (TOML: a list); booleans are ``true``/
``false`` (also yes/no, on/off, 1/0); budgets are ``queue:gpu=2h,dag:train=30m`` (TOML: a table).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError
from pydantic_core import PydanticCustomError

from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.units import parse_duration

FINITE = "a finite number (nan and inf are not durations or amounts)"
HIDDEN = "**********"  # what an error shows of a secret's value


def _refuse(allowed: str, **override: Any) -> PydanticCustomError:
    """A validation error whose message is ``allowed``; ``setting``/``value`` override the field's."""
    return PydanticCustomError("outpost", "{allowed}", {"allowed": allowed, **override})


def _seconds(raw: Any) -> Any:
    if raw is None or isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return float(raw)  # a plain number: the range checks say what is allowed
        except ValueError:
            try:
                return parse_duration(raw)  # "15m", "1h30m"
            except ValueError:
                pass
    raise _refuse("a number of seconds or a duration such as 15m or 1h")


def _integer(raw: Any) -> Any:
    if isinstance(raw, bool):  # TOML true is not 1
        raise _refuse("an integer")
    return raw


def _boolean(raw: Any) -> Any:
    return raw.strip() if isinstance(raw, str) else raw


def _path(raw: Any) -> Any:
    return None if raw is None else Path(os.path.expanduser(str(raw)))


def _items(raw: Any) -> Any:
    """``"a, b"`` or ``["a", "b"]`` -> ``("a", "b")``; empty items are dropped."""
    if raw is None or isinstance(raw, tuple):
        return raw
    items = raw if isinstance(raw, list) else [item.strip() for item in str(raw).split(",")]
    return tuple(str(item) for item in items if item != "")


def _devices(raw: Any) -> Any:
    items = _items(raw)
    return () if items is not None and [str(i).lower() for i in items] == ["none"] else items


def _lines(raw: Any) -> Any:
    """One regular expression per line (a TOML list is kept as is)."""
    if isinstance(raw, (list, tuple)):
        return tuple(str(p) for p in raw)
    return tuple(p for p in str(raw).splitlines() if p)


def _budgets(raw: Any) -> Any:
    """``{"queue:gpu": "2h"}`` (TOML) or ``"queue:gpu=2h,dag:train=30m"`` (env/flag) -> sorted pairs."""
    if isinstance(raw, tuple):
        return raw
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        pairs = []
        for item in str(raw).split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise _refuse("comma-separated queue:<name>=<duration> or dag:<id>=<duration>, e.g. queue:gpu=2h")
            pairs.append((key, value))
    out: dict[str, float] = {}
    for key, value in pairs:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _refuse("a duration per UTC day such as 2h, 30m or 900", value=f"{key}={value}") from None
        if not math.isfinite(seconds):
            raise _refuse(FINITE, setting=f"budgets {key}", value=seconds)
        out[str(key).strip()] = seconds
    return tuple(sorted(out.items()))


Seconds = Annotated[float, BeforeValidator(_seconds)]
OptSeconds = Annotated[float | None, BeforeValidator(_seconds)]
Count = Annotated[int, BeforeValidator(_integer)]
OptCount = Annotated[int | None, BeforeValidator(_integer)]
Flag = Annotated[bool, BeforeValidator(_boolean)]
FilePath = Annotated[Path, BeforeValidator(_path)]
OptPath = Annotated[Path | None, BeforeValidator(_path)]
Names = Annotated[tuple[str, ...], BeforeValidator(_items)]
OptNames = Annotated[tuple[str, ...] | None, BeforeValidator(_items)]
Devices = Annotated[tuple[str, ...] | None, BeforeValidator(_devices)]
Patterns = Annotated[tuple[str, ...], BeforeValidator(_lines)]
Budgets = Annotated[tuple[tuple[str, float], ...], BeforeValidator(_budgets)]

# What each kind of pydantic error allows, said as the rest of the worker's errors say it.
_ALLOWED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "finite_number": FINITE,
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "path_type": "a file or folder path",
    "tuple_type": "a comma-separated list (TOML: a list)",
}
_REQUIRED = {"api_url": "required: pass --api-url, set OUTPOST_API_URL, or api_url in the config file"}


def config_error(exc: ValidationError, secrets: tuple[str, ...] = ()) -> ConfigError:
    """The first of pydantic's errors as a :class:`ConfigError`; a secret's value is never shown."""
    err = exc.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    setting = str(ctx.get("setting") or (err["loc"][0] if err["loc"] else "settings"))
    value = ctx["value"] if "value" in ctx else err.get("input")
    if err["type"] == "missing":
        value = None
    elif setting in secrets:
        value = HIDDEN
    if err["type"] == "missing":
        allowed = _REQUIRED.get(setting, "required")
    else:
        allowed = str(ctx.get("allowed") or _ALLOWED.get(err["type"]) or err["msg"])
    return ConfigError(setting, value, allowed)
