"""The worker's state folder: an exclusive lock, the job journal and the status file.

* ``worker.lock``: held (``flock``) for the worker's lifetime, so two workers never share a
  state folder.
* ``jobs/<id>.json``: one journal entry per job the worker has claimed, written before the job
  starts (then with its task process's pid) and removed once its final state is in the outbox
  (``outbox.sqlite``, :mod:`worker.outbox`, which owns delivery). An entry left behind by a crash
  tells the next start which jobs to stop and report failed (never as success: a known outcome
  is already in the outbox).
* ``status.json``: a snapshot for ``outpost status``, replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.errors import OutpostError
from worker.jobs import JobKey


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_atomic` of ``data`` as JSON."""
    write_atomic(path, json.dumps(data, indent=1, default=str).encode())


class StateFolder:
    """Owns the state folder for one worker process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.output_dir = self.root / "task-output"
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create the folder and take its lock, or raise if another worker holds it."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "worker.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutpostError(
                f"another outpost worker is using the state folder {self.root} "
                "(give each worker its own --state-folder)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- journal -----------------------------------------------------------------------------
    def _entry(self, key: JobKey) -> Path:
        digest = hashlib.sha256(json.dumps(key.as_dict(), sort_keys=True).encode()).hexdigest()[:24]
        return self.jobs_dir / f"{digest}.json"

    def journal_start(self, key: JobKey, pid: int | None) -> None:
        write_json_atomic(self._entry(key), {"key": key.as_dict(), "pid": pid, "started": time.time(), "final_state": None})

    def journal_done(self, key: JobKey) -> None:
        self._entry(key).unlink(missing_ok=True)

    def journal_leftovers(self) -> list[dict[str, Any]]:
        """Entries from a previous worker process, each with ``key`` as a :class:`JobKey`."""
        out = []
        for path in sorted(self.jobs_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                data["key"] = JobKey(**data["key"])
            except (ValueError, TypeError, KeyError):
                path.rename(path.with_suffix(".corrupt"))
                continue
            out.append(data)
        return out

    # -- status ------------------------------------------------------------------------------
    def write_status(self, status: dict[str, Any]) -> None:
        write_json_atomic(self.root / "status.json", status)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / "status.json").read_text())
        except FileNotFoundError:
            return None
