"""Airflow glue: publish a runner's summary as the extra of an asset event.

A task that declares ``outlets=[asset]`` and calls ``emit(asset, summary)`` makes Airflow record an
asset event carrying the summary when the task succeeds; DAGs scheduled on that asset
(``schedule=[asset]``) then run, and read the summary from ``triggering_asset_events``. The
summary is the small dict a runner returns for XCom (counts, versions, checksums, local URIs),
never vectors or texts, so this moves no data out of the region.

Only this module imports Airflow; the runners themselves run without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from airflow_outpost.runners.errors import RunnerError
from airflow_outpost.runners.results import AssetExtra

__all__ = ["MAX_EXTRA_BYTES", "AssetExtra", "emit"]

# An event's extra lives in the metadata database and travels to every consumer: keep it small.
MAX_EXTRA_BYTES = 64 * 1024


def _uri(asset: Any) -> str:
    return str(getattr(asset, "uri", asset))


def emit(asset: Any, summary: Mapping[str, Any], *, context: Mapping[str, Any] | None = None) -> AssetExtra:
    """Attach ``summary`` as the extra of the event the running task emits for ``asset``.

    ``asset`` is an ``airflow.sdk.Asset`` (or its URI) that the task declares in ``outlets``;
    ``context`` defaults to the running task's. Returns the extra as stored, an ``AssetExtra``:
    a JSON copy of ``summary`` with the same keys (tuples become lists, other non-JSON values
    their ``str``; a runner's summary, e.g. an ``IndexSummary``, comes back unchanged). Calling it
    again for the same asset merges into the same event. Raises ``RunnerError`` if the task does
    not declare the asset (Airflow would silently drop the event) or the summary is larger than
    ``MAX_EXTRA_BYTES``. Nothing is sent until the task succeeds; a failed try emits no event, so
    a retried task emits one event, from the try that succeeds.
    """
    from airflow.sdk import Asset, get_current_context

    ctx = context if context is not None else get_current_context()
    asset = asset if isinstance(asset, Asset) else Asset(str(asset))
    task = ctx["task"]
    declared = [_uri(o) for o in getattr(task, "outlets", None) or []]
    if asset.uri not in declared:
        raise RunnerError(
            f"task {task.task_id!r} does not declare outlets=[Asset({asset.uri!r})]; Airflow only records "
            f"events for declared outlets (declared: {declared or 'none'})"
        )
    text = json.dumps(dict(summary), default=str, sort_keys=True)
    if len(text.encode()) > MAX_EXTRA_BYTES:
        raise RunnerError(f"summary for {asset.uri} is {len(text.encode())} bytes as JSON; asset event extras "
                          f"are limited to {MAX_EXTRA_BYTES}: pass counts, versions and URIs, not data")
    extra = json.loads(text)
    ctx["outlet_events"][asset].extra.update(extra)
    return extra
