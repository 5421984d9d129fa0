"""Removing the work of embedding runs that never published.

A run that dies leaves whole shards (``shards/<key>-NNNNN.npy`` with ``.ids.json`` and
``.meta.json``) and partition parts (``catalog/part-<key>.parquet`` and ``.json``) for its retry
to reuse. A run that is never retried (the corpus changed, the DAG was abandoned) would leave
them for ever. After each publish, the work of keys no version references is removed once its
newest file is older than ``EmbedConfig.keep_unpublished_s``, so a retry within that time still
finds it. Runs under the name's writer lock, so no writer of the name is adding files meanwhile.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SHARD = re.compile(r"^(?P<key>[0-9a-f]{24})-\d{5}\.(npy|ids\.json|meta\.json)$")
_PART = re.compile(r"^part-(?P<key>[0-9a-f]{24})\.(parquet|json)$")


def referenced_keys(root: Path, manifest: dict[str, Any]) -> set[str]:
    """Keys of every part of every version's catalog, and of every shard the manifest lists."""
    keys: set[str] = set()
    for catalog in root.glob("catalog-v*.json"):
        keys.update(p["key"] for p in json.loads(catalog.read_text(encoding="utf-8")).get("parts", []) if p.get("key"))
    for shard in manifest.get("shards", []):
        m = _SHARD.match(Path(shard["file"]).name)
        if m:
            keys.add(m["key"])
    return keys


def sweep_unpublished(root: Path, manifest: dict[str, Any], keep_s: float, *, now: float | None = None) -> int:
    """Remove the files of unreferenced keys whose newest file is older than ``keep_s``; return
    how many were removed. Files of other shapes (earlier layouts) are never touched."""
    keep = referenced_keys(root, manifest)
    by_key: dict[str, list[Path]] = {}
    for folder, pattern in ((root / "shards", _SHARD), (root / "catalog", _PART)):
        if folder.is_dir():
            for path in folder.iterdir():
                m = pattern.match(path.name)
                if m and m["key"] not in keep:
                    by_key.setdefault(m["key"], []).append(path)
    cutoff = (time.time() if now is None else now) - keep_s
    removed = 0
    for key, paths in by_key.items():
        if max(p.stat().st_mtime for p in paths) > cutoff:
            continue  # recent: an interrupted run's retry may still reuse it
        for path in paths:
            path.unlink(missing_ok=True)
            removed += 1
        log.info("embeddings %s: removed %d files of an unpublished run (key %s)", root.name, len(paths), key)
    return removed
