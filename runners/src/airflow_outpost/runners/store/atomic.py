"""Atomic file and directory publication for the region-local store.

Every output the runners produce is first written under a temporary name in the same
directory, flushed and fsync'd, then renamed over its final name. A crash at any point
leaves either the previous file or the new one under the final name, never a half file;
leftover temporaries start with ``.tmp-`` and are ignored by readers.

A temporary's name records its owner: ``.tmp-<final name>.<host>~<pid>.<random>``. ``sweep_orphans``
removes only temporaries whose owner is gone: a dead process on this host, or (when the caller
holds the name's writer lock, so every other writer's lease has ended) another host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

TMP_PREFIX = ".tmp-"
_OWNER_RE = re.compile(r"\.(?P<host>[A-Za-z0-9_-]+)~(?P<pid>\d+)\.[^.]*$")


def _host_tag(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", host)[:64] or "_"


def owner_tag() -> str:
    """``<host>~<pid>`` of this process, as it appears in its temporaries' names."""
    return f"{_host_tag(socket.gethostname())}~{os.getpid()}"


def temp_prefix(final: Path) -> str:
    """Prefix of a temporary for ``final``: ``.tmp-<name>.<host>~<pid>.``"""
    return f"{TMP_PREFIX}{final.name}.{owner_tag()}."


def temp_owner(name: str) -> tuple[str, int] | None:
    """``(host tag, pid)`` recorded in a temporary's name, or None for an untagged (older) one."""
    m = _OWNER_RE.search(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


def sweep_orphans(base: Path, *, writer_lock_held: bool, recursive: bool = True) -> int:
    """Delete ``.tmp-*`` under ``base`` whose owner is gone; return how many.

    Always removed: temporaries of a dead process on this host. With ``writer_lock_held`` (the
    caller holds ``base``'s writer lock, so no other writer's lease is alive) also those of other
    hosts and untagged ones. Temporaries of a live process on this host are kept.
    """
    from airflow_outpost.runners.store.writer_lock import pid_alive

    if not base.is_dir():
        return 0
    here = _host_tag(socket.gethostname())
    found = base.rglob(TMP_PREFIX + "*") if recursive else base.glob(TMP_PREFIX + "*")
    removed = 0
    for p in sorted(found, reverse=True):
        owner = temp_owner(p.name)
        if owner is not None and owner[0] == here:
            if owner[1] == os.getpid() or pid_alive(owner[1]):
                continue
        elif not writer_lock_held:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary temp file next to ``path``; on clean exit fsync and rename it to ``path``.

    If the body raises, the temp file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(final), dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as pretty, key-sorted JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on clean exit rename it to ``path``.

    ``path`` must not exist yet (versioned outputs are never overwritten in place).
    If the body raises, the temporary directory is deleted.
    """
    final = Path(path)
    if final.exists():
        raise FileExistsError(f"refusing to overwrite existing output directory {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_symlink(target: str, link: str | os.PathLike[str]) -> None:
    """Point symlink ``link`` at ``target`` atomically (create a temp link, rename over)."""
    link = Path(link)
    tmp = link.with_name(temp_prefix(link) + "link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
