"""On-disk layout of a versioned FAISS index, and the promotion log behind ``current``.

::

    <index_dir>/
      manifest.json            store-style manifest: current version, promotion history, lineage
      current -> versions/v000003
      versions/v000001/        index.faiss, manifest.json, eval_*.npy, deleted.npy, id_*.npy,
                               index.ivfdata (on-disk lists), rerank_*.npy (the rerank's id -> shard row map)
      versions/v000002/
      versions/.tmp-v000004.<host>~<pid>.*  a build in progress or interrupted; ignored, swept
                               by the next writer once its owner is gone
      .writer.lock, .writer.lease  the one-writer lock (airflow_outpost.runners.store.writer_lock)

The ``current`` symlink is the commit point of a promotion (one atomic rename). The top-level
manifest is written after it and carries the history that ``rollback`` walks back; if a crash
lands between the two, the symlink wins and the history is trimmed to end at it on next use.

Writers (``build_index``/``update_index`` publishing a version, ``promote``, ``rollback``) hold
the index directory's writer lock while they pick a version number and read-modify-write the
history, so concurrent writers on one or several hosts get gapless versions and lose no event.
Each version manifest records ``index_sha256``; ``load_index`` checks it before serving.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

from airflow_outpost.runners.errors import IndexStateError, ManifestError, StoreError
from airflow_outpost.runners.results import PromoteResult, RollbackResult
from airflow_outpost.runners.store.atomic import atomic_symlink, atomic_write_json, sweep_orphans
from airflow_outpost.runners.store.region_store import SCHEMA_VERSION, code_version, verify_file
from airflow_outpost.runners.store.writer_lock import LockSettings, writer_lock

VERSIONS = "versions"
CURRENT = "current"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
_VERSION_RE = re.compile(r"^v(\d{6})$")


def is_index_dir(path: Path) -> bool:
    """True if ``path`` has this layout (a ``current`` link or a ``versions/`` folder); reads nothing else."""
    return (path / CURRENT).is_symlink() or (path / VERSIONS).is_dir()


def version_dir(index_dir: Path, version: str) -> Path:
    """Path of ``version`` under ``index_dir`` (not checked)."""
    if not _VERSION_RE.match(version):
        raise IndexStateError(f"invalid index version {version!r}; expected v000001-style names")
    return index_dir / VERSIONS / version


def list_versions(index_dir: str | os.PathLike[str]) -> list[str]:
    """Complete (renamed-into-place) versions, oldest first; temporaries are skipped. Reads only."""
    base = Path(index_dir) / VERSIONS
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file())


def next_version(index_dir: Path) -> str:
    """The version name after the highest one present (complete or not yet swept)."""
    base = index_dir / VERSIONS
    numbers = [0]
    if base.is_dir():
        for p in base.iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                numbers.append(int(m.group(1)))
    return f"v{max(numbers) + 1:06d}"


def sweep_temporaries(index_dir: Path) -> int:
    """Remove leftovers of interrupted builds (``.tmp-*`` in ``versions/`` and the top level); return how many.

    Call it holding the index directory's writer lock: then every other writer's lease has
    ended, and only a live process on this host can still own a temporary (kept).
    """
    return sweep_orphans(index_dir / VERSIONS, writer_lock_held=True, recursive=False) + sweep_orphans(
        index_dir, writer_lock_held=True, recursive=False)


def load_index(index_dir: Path, version: str, manifest: dict[str, Any] | None = None, *, read_only: bool = False) -> Any:
    """Read ``index.faiss`` of ``version`` after checking it against the ``index_sha256`` its manifest records.

    A version built ``on_disk`` keeps its inverted lists in ``index.ivfdata`` next to the index
    (checked against ``ivfdata_sha256``); they are memory-mapped, not read, and with
    ``read_only`` mapped read-only (searchers).
    """
    import faiss

    vm = manifest if manifest is not None else read_version_manifest(index_dir, version)
    path = version_dir(index_dir, version) / INDEX_FILE
    verify_file(path, vm.get("index_sha256"), "FAISS index")
    if not vm.get("on_disk"):
        return faiss.read_index(str(path))
    verify_file(path.with_name(IVFDATA_FILE), vm.get("ivfdata_sha256"), "FAISS on-disk inverted lists")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_READ_ONLY if read_only else 0)
    return faiss.read_index(str(path), flags)


def current_version(index_dir: str | os.PathLike[str]) -> str | None:
    """Name of the promoted version (``current`` symlink target), or None if none was promoted. Reads only."""
    link = Path(index_dir) / CURRENT
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    return Path(target).name


def read_version_manifest(index_dir: Path, version: str) -> dict[str, Any]:
    """Manifest of one version; IndexStateError if the version does not exist."""
    path = version_dir(index_dir, version) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexStateError(f"{index_dir}: no index version {version}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc


def read_index_manifest(index_dir: Path) -> dict[str, Any]:
    """Top-level manifest with ``history`` reconciled against the ``current`` symlink."""
    path = index_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        manifest = {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    history: list[str] = list(manifest.get("history", []))
    current = current_version(index_dir)
    if current is None:
        history = []
    elif current in history:
        history = history[: len(history) - history[::-1].index(current)]
    else:
        # The symlink moved but the manifest write did not happen (crash between the two).
        history.append(current)
    manifest["history"] = history
    manifest["current"] = current
    return manifest


def _write_index_manifest(index_dir: Path, history: list[str], event: dict[str, Any]) -> dict[str, Any]:
    current = history[-1] if history else None
    body: dict[str, Any] = {}
    if current is not None:
        vm = read_version_manifest(index_dir, current)
        body = {"inputs": vm.get("inputs", []), "model": vm.get("model"), "count": vm.get("count")}
    previous = read_index_manifest(index_dir)
    events = (previous.get("events") or [])[-49:] + [event]
    manifest = {
        **body,
        "schema": SCHEMA_VERSION,
        "kind": "indexes",
        "name": index_dir.name,
        "current": current,
        "history": history,
        "events": events,
        "code_version": code_version(),
        "written_at": _now(),
    }
    atomic_write_json(index_dir / MANIFEST, manifest)
    return manifest


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def promote(
    index_dir: str | os.PathLike[str], version: str, *, min_recall: float | None = None, lock: LockSettings | None = None,
) -> PromoteResult:
    """Point ``current`` at ``version`` atomically, if its recorded recall passes the gate.

    ``min_recall`` defaults to the threshold recorded when the version was built. Raises
    IndexStateError (and changes nothing) if the version is missing or its recall is below
    the threshold. Idempotent, so safe to retry: promoting the current version again is a no-op.
    A crash between the link and the manifest write is repaired on next use (the link wins).
    Returns a ``PromoteResult`` (``current``, ``previous``, ``recall``). Holds the index
    directory's writer lock (``lock``, default from ``OUTPOST_STORE_LOCK*``; StoreBusyError after
    its timeout), so concurrent promotions and rollbacks apply one after the other.
    """
    index_dir = Path(index_dir)
    with writer_lock(index_dir, lock):
        return _promote_locked(index_dir, version, min_recall)


def _promote_locked(index_dir: Path, version: str, min_recall: float | None) -> PromoteResult:
    vm = read_version_manifest(index_dir, version)
    recall = vm.get("recall", {}).get("value")
    threshold = vm.get("recall", {}).get("min_recall") if min_recall is None else min_recall
    if threshold is not None and (recall is None or recall < threshold):
        raise IndexStateError(
            f"{index_dir}: refusing to promote {version}: recall@{vm['recall'].get('k')} "
            f"{recall} < threshold {threshold}; current stays {current_version(index_dir)}"
        )
    manifest = read_index_manifest(index_dir)
    previous = manifest["current"]
    if previous != version:
        atomic_symlink(f"{VERSIONS}/{version}", index_dir / CURRENT)
        _write_index_manifest(
            index_dir,
            manifest["history"] + [version],
            {"event": "promote", "version": version, "previous": previous, "recall": recall, "at": _now()},
        )
    return {"current": version, "previous": previous, "recall": recall}


def rollback(index_dir: str | os.PathLike[str], *, lock: LockSettings | None = None) -> RollbackResult:
    """Point ``current`` back at the version promoted before it; return a ``RollbackResult``
    (``current``, ``rolled_back``).

    Raises IndexStateError if there is no earlier promoted version. Each call steps back one
    promotion, so it is not idempotent: a retry after a successful call steps back again. The
    rolled-back version stays on disk and can be promoted again. Holds the writer lock like ``promote``.
    """
    index_dir = Path(index_dir)
    with writer_lock(index_dir, lock):
        return _rollback_locked(index_dir)


def _rollback_locked(index_dir: Path) -> RollbackResult:
    manifest = read_index_manifest(index_dir)
    history = manifest["history"]
    if len(history) < 2:
        raise IndexStateError(f"{index_dir}: nothing to roll back to (promotion history: {history})")
    target, dropped = history[-2], history[-1]
    if not (version_dir(index_dir, target) / INDEX_FILE).is_file():
        raise StoreError(f"{index_dir}: previous version {target} is missing its {INDEX_FILE}")
    atomic_symlink(f"{VERSIONS}/{target}", index_dir / CURRENT)
    _write_index_manifest(
        index_dir, history[:-1], {"event": "rollback", "version": target, "previous": dropped, "at": _now()}
    )
    return {"current": target, "rolled_back": dropped}
