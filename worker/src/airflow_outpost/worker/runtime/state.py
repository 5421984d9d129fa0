"""The worker's state folder: an exclusive lock, the job journal and the status file.

* ``worker.lock``: held (``flock``) for the worker's lifetime, so two workers never share a
  state folder.
* ``jobs/<id>.json``: one journal entry per job the worker has claimed, written before the job
  starts (then with its task process's pid and what a restart needs to take the process over)
  and removed once its final state is in the outbox (``outbox.sqlite``, :mod:`airflow_outpost.worker.runtime.outbox`,
  which owns delivery). An entry left behind by a crash tells the next start which jobs to stop
  or adopt (``crash_policy``) and which to report failed.
* ``exits/<id>.json``: the exit code a task process recorded itself when its ``supervise_task``
  returned (:func:`record_exit`), so the outcome of a task that ended while no worker was
  running is known; removed with the journal entry. No exit file means no known outcome, which
  is reported failed, never success.
* ``gateway.json``: the egress gateway's loopback port and secret path prefix, so a restart can
  serve the same URL and adopted task processes (which were given it) keep reaching the control
  plane; read, checked and written by :mod:`airflow_outpost.worker.egress.gateway_file`.
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

from airflow_outpost.worker.edge.jobs import JobKey
from airflow_outpost.worker.errors import OutpostError


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    ``durable``: also on disk when this returns (the file and its folder fsynced), so it outlives a
    power cut, not only a crashed process. Two syncs: milliseconds on a busy disk, on the worker's
    event loop; what is rewritten right after, or only informs, goes without.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """:func:`write_atomic` of ``data`` as JSON."""
    write_atomic(path, json.dumps(data, indent=1, default=str).encode(), durable=durable)


def record_exit(path: str | os.PathLike[str], code: int) -> None:
    """Record a task process's exit code durably (called by the task process itself).

    Written atomically, so a reader sees the whole record or none; a retry simply replaces it.
    """
    write_json_atomic(Path(path), {"code": int(code), "pid": os.getpid(), "ended": time.time()})


def read_exit(path: Path) -> int | None:
    """The exit code recorded at ``path``, or ``None`` if there is none (or it is unreadable)."""
    try:
        code = json.loads(path.read_text())["code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


class StateFolder:
    """Owns the state folder for one worker process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.output_dir = self.root / "task-output"
        self.exits_dir = self.root / "exits"
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create the folder and take its lock, or raise if another worker holds it."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.exits_dir.mkdir(parents=True, exist_ok=True)
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
    @staticmethod
    def _digest(key: JobKey) -> str:
        return hashlib.sha256(json.dumps(key.as_dict(), sort_keys=True).encode()).hexdigest()[:24]

    def _entry(self, key: JobKey) -> Path:
        return self.jobs_dir / f"{self._digest(key)}.json"

    def exit_file(self, key: JobKey) -> Path:
        """Where the task process of ``key`` records its exit code (:func:`record_exit`)."""
        return self.exits_dir / f"{self._digest(key)}.json"

    def journal_start(self, key: JobKey, pid: int | None, details: dict[str, Any] | None = None) -> None:
        """Journal ``key`` as claimed (``pid`` once its task process runs). ``details``: what a
        restart needs to adopt the process (see :mod:`airflow_outpost.worker.runtime.recovery`)."""
        if pid is None:  # a fresh claim: an exit record of an earlier attempt is not this one's
            self.exit_file(key).unlink(missing_ok=True)
        # The claim is rewritten with the pid a few milliseconds later, durably; a power cut in
        # between also ends the task it would describe, and the control plane times out a try
        # that never started. So only the second write waits for the disk.
        write_json_atomic(self._entry(key), {"key": key.as_dict(), "pid": pid, "started": time.time(),
                                             "final_state": None, **(details or {})}, durable=pid is not None)

    def journal_update(self, key: JobKey, **fields: Any) -> bool:
        """Merge ``fields`` into the entry of ``key``; False (and nothing written) if it is done."""
        path = self._entry(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(data, dict):  # not an entry this worker wrote: leave it to recovery
            return False
        write_json_atomic(path, {**data, **fields})
        return True

    def journal_done(self, key: JobKey) -> None:
        self._entry(key).unlink(missing_ok=True)
        self.exit_file(key).unlink(missing_ok=True)

    def prune_exits(self) -> int:
        """Remove exit records that belong to no journal entry (their job is done); return how many."""
        live = {p.stem for p in self.jobs_dir.glob("*.json")}
        pruned = 0
        for path in self.exits_dir.glob("*.json"):
            if path.stem not in live:
                path.unlink(missing_ok=True)
                pruned += 1
        return pruned

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
        """What ``outpost status`` reads; rewritten on every change, so not synced to disk."""
        write_json_atomic(self.root / "status.json", status, durable=False)

    def read_status(self) -> dict[str, Any] | None:
        """The last status written, or None if there is none or it is unreadable (written without
        fsync, a power cut can leave it empty or cut short)."""
        try:
            status = json.loads((self.root / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) else None

    def lock_holder(self) -> int | None:
        """The pid of the worker holding this folder's lock now; None if no process holds it, or the
        lock file cannot be opened by this user (then it cannot tell).

        Takes a shared lock for a moment to ask (a worker starting at that very moment fails to take
        its lock and says so)."""
        try:
            fd = os.open(self.root / "worker.lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                held = False
                fcntl.flock(fd, fcntl.LOCK_UN)
            text = os.read(fd, 32).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return int(text) if held and text.isdigit() else None

    # -- requests from the local CLI (outpost maintenance) ------------------------------------
    @property
    def maintenance_request_file(self) -> Path:
        return self.root / "maintenance-request.json"

    def request_maintenance(self, on: bool, comments: str | None = None) -> None:
        """Ask the running worker to enter (``on``) or leave maintenance; it reads the request at
        its next main-loop turn (within ``poll_interval_s``). A later request replaces an unread one."""
        write_json_atomic(self.maintenance_request_file, {"maintenance": "on" if on else "off", "comments": comments})

    def take_maintenance_request(self) -> tuple[bool, str | None] | None:
        """The pending local maintenance request (and remove it), or None. A malformed one is dropped."""
        path = self.maintenance_request_file
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = None
        path.unlink(missing_ok=True)
        if not isinstance(data, dict) or data.get("maintenance") not in ("on", "off"):
            return None
        comments = data.get("comments")
        return data["maintenance"] == "on", comments if isinstance(comments, str) else None

