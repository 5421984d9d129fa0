"""One writer per store name at a time, on a local disk or on NFS shared by several hosts.

``writer_lock(directory)`` serialises the writers of one ``embeddings/<name>`` or
``indexes/<name>`` directory (version allocation and publication). Two mechanisms, in this order:

1. **fcntl** (``mode="auto"``, the default): a POSIX record lock (``fcntl.lockf``) on
   ``<directory>/.writer.lock``. Local file systems and NFS mounted with locking (NFSv4, or v3
   with lockd; not ``nolock``) honour it across processes and hosts, and the kernel (or the NFS
   server, after its own lease) releases it when the holder dies. If the mount refuses it
   (``ENOLCK``, ``EOPNOTSUPP``...), the lock falls back to the lease file alone.
2. **Lease file**, always: ``<directory>/.writer.lease``, a JSON record of the holder (``host``,
   ``pid``, process start time, a unique ``token``, ``since``, ``expires``), created with
   ``link()`` from a unique temporary (atomic on every NFS version; ``O_EXCL`` where hard links
   are refused) and renewed by a background thread every ``ttl_s / 3``. It is what makes the lock
   hold where fcntl does not, and what names the holder in ``StoreBusyError``.

A lease is stale, and is taken over, when it has expired (hosts' clocks must agree to well under
``ttl_s``: NTP), when its holder is on this host and its process is gone (at once, no waiting),
or when it records that its holder had the fcntl lock and we now hold that lock (the kernel freed
it, so the holder is gone). Breaking a stale lease happens under a short ``.writer.lease.break``
mutex so two waiters cannot both break and re-create it.

Inside one process a thread lock comes first (POSIX locks belong to the process, not the thread),
and the lock is re-entrant per thread, so ``update_index`` may fall back to ``build_index``.

Settings (``LockSettings``, from the environment by default):

    OUTPOST_STORE_LOCK            auto | lease        lease = skip fcntl (mounts whose locks lie)
    OUTPOST_STORE_LOCK_TIMEOUT_S  900                 how long a second writer waits, then StoreBusyError
    OUTPOST_STORE_LEASE_TTL_S     60                  lease lifetime without renewal
    OUTPOST_STORE_LOCK_HOST       socket.gethostname  the holder's host name (containers, tests)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_outpost.runners.errors import LeaseLostError, SettingError, StoreBusyError

__all__ = ["LEASE_NAME", "LOCK_NAME", "LockSettings", "WriterLease", "pid_alive", "read_lease", "writer_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
LEASE_NAME = ".writer.lease"
_BREAK_NAME = ".writer.lease.break"
_MODES = ("auto", "lease")
# errnos by which a file system says it does not do POSIX locks.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
if hasattr(errno, "ENOTSUP"):
    _NO_LOCKS.add(errno.ENOTSUP)


@dataclass(frozen=True)
class LockSettings:
    """How writers of one store name wait for each other. Invalid values raise SettingError naming the setting."""

    mode: str = "auto"
    timeout_s: float = 900.0
    ttl_s: float = 60.0
    host: str = field(default_factory=socket.gethostname)
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        checks = [
            ("OUTPOST_STORE_LOCK", self.mode, self.mode in _MODES, f"one of {', '.join(_MODES)}"),
            ("OUTPOST_STORE_LOCK_TIMEOUT_S", self.timeout_s, self.timeout_s >= 0, ">= 0 seconds"),
            ("OUTPOST_STORE_LEASE_TTL_S", self.ttl_s, self.ttl_s >= 1, ">= 1 second"),
            ("OUTPOST_STORE_LOCK_HOST", self.host, bool(self.host) and "\n" not in self.host, "a non-empty host name"),
            ("poll_s", self.poll_s, self.poll_s > 0, "> 0 seconds"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise SettingError(f"{name}={value!r} is not allowed: must be {allowed}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LockSettings:
        """Settings from ``OUTPOST_STORE_LOCK*`` variables (see the module docstring); defaults where unset."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        if env.get("OUTPOST_STORE_LOCK"):
            kwargs["mode"] = env["OUTPOST_STORE_LOCK"]
        for var, key in (("OUTPOST_STORE_LOCK_TIMEOUT_S", "timeout_s"), ("OUTPOST_STORE_LEASE_TTL_S", "ttl_s")):
            if env.get(var):
                try:
                    kwargs[key] = float(env[var])
                except ValueError as exc:
                    raise SettingError(f"{var}={env[var]!r} is not allowed: must be a number of seconds") from exc
        if env.get("OUTPOST_STORE_LOCK_HOST"):
            kwargs["host"] = env["OUTPOST_STORE_LOCK_HOST"]
        return cls(**kwargs)


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot) from /proc, to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="seconds")


def read_lease(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lease record of ``directory`` (holder host, pid, token, since, expires), or None if free."""
    try:
        raw = (Path(directory) / LEASE_NAME).read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        # A lease is always linked into place complete; garbage means someone wrote it by hand.
        return {"token": None, "host": None, "pid": None, "expires": 0.0, "raw": raw[:200].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {"token": None, "expires": 0.0}


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; True if we created it. NFS-safe.

    ``link()`` of a complete unique file is atomic on every NFS version; if a lost reply makes it
    raise although it worked, the temporary's link count (2) says so. Mounts that refuse hard
    links get ``O_EXCL`` (atomic on NFSv3+ and local disks).
    """
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            with contextlib.suppress(OSError):
                if os.stat(tmp).st_nlink == 2:
                    return True
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class WriterLease:
    """A held writer lock on one directory (yielded by ``writer_lock``).

    ``mode`` says what holds it: ``"fcntl+lease"`` or ``"lease"``. ``check()`` raises
    LeaseLostError if the lease expired and was taken over; writers call it right before their
    commit point.
    """

    def __init__(self, directory: Path, settings: LockSettings) -> None:
        self.directory = directory
        self.settings = settings
        self.token = uuid.uuid4().hex
        self.host = settings.host
        self.pid = os.getpid()
        self.mode = "lease"
        self.since = time.time()
        self._fcntl_fd: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def lease_path(self) -> Path:
        return self.directory / LEASE_NAME

    def _record(self) -> bytes:
        now = time.time()
        body = {
            "host": self.host, "pid": self.pid, "start": _proc_start(self.pid), "token": self.token,
            "since": _iso(self.since), "expires": now + self.settings.ttl_s, "expires_at": _iso(now + self.settings.ttl_s),
            "fcntl": self._fcntl_fd is not None,
        }
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    # -- acquisition ---------------------------------------------------------------------------
    def acquire(self, deadline: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.settings.mode == "auto":
            self._acquire_fcntl(deadline)
        self.mode = "fcntl+lease" if self._fcntl_fd is not None else "lease"
        try:
            self._acquire_lease(deadline)
        except BaseException:
            self._release_fcntl()
            raise
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-renew:{self.directory.name}",
                                         daemon=True)
        self._renewer.start()

    def _acquire_fcntl(self, deadline: float) -> None:
        import fcntl

        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fcntl_fd = fd
                return
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    if time.time() >= deadline:
                        os.close(fd)
                        raise self._busy(read_lease(self.directory), "fcntl lock") from exc
                    time.sleep(self.settings.poll_s)
                    continue
                os.close(fd)
                if exc.errno in _NO_LOCKS:
                    log.info("%s: the file system refuses fcntl locks (%s); using the lease file alone",
                             self.directory, exc)
                    return
                raise

    def _acquire_lease(self, deadline: float) -> None:
        while True:
            if _create_exclusive(self.lease_path, self._record()):
                return
            holder = read_lease(self.directory)
            if holder is None:
                continue  # released between our attempt and the read
            reason = self._stale_reason(holder)
            if reason is not None:
                if self._break(holder, reason):
                    continue
            if time.time() >= deadline:
                raise self._busy(holder, "lease")
            time.sleep(self.settings.poll_s)

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        if holder.get("token") == self.token:
            return None
        expires = holder.get("expires")
        if not isinstance(expires, (int, float)) or expires < time.time():
            return f"expired at {holder.get('expires_at')}"
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int):
            if not pid_alive(pid):
                return f"its process {pid} on this host is gone"
            start = holder.get("start")
            if start is not None and _proc_start(pid) not in (None, start):
                return f"its process {pid} on this host is gone (the pid was reused)"
        if holder.get("fcntl") and self._fcntl_fd is not None:
            return "its holder had the fcntl lock, which we now hold"
        return None

    def _break(self, holder: dict[str, Any], reason: str) -> bool:
        """Remove a stale lease if it is still the one we judged; True if the lease is gone now."""
        mutex = self.directory / _BREAK_NAME
        if not _create_exclusive(mutex, self._record()):
            other = read_lease_at(mutex)
            # A breaker holds it for milliseconds; one that crashed holding it is cleared after a TTL.
            if other is None or other.get("expires", 0) + self.settings.ttl_s < time.time():
                with contextlib.suppress(FileNotFoundError):
                    mutex.unlink()
            return False
        try:
            current = read_lease(self.directory)
            if current is None:
                return True
            if current.get("token") != holder.get("token"):
                return False
            log.warning("%s: taking over the writer lease of %s pid %s since %s: %s", self.directory,
                        holder.get("host"), holder.get("pid"), holder.get("since"), reason)
            with contextlib.suppress(FileNotFoundError):
                self.lease_path.unlink()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                mutex.unlink()

    def _busy(self, holder: dict[str, Any] | None, what: str) -> StoreBusyError:
        holder = holder or {}
        return StoreBusyError(
            f"{self.directory}: another writer holds the {what} (host {holder.get('host')!r}, pid "
            f"{holder.get('pid')}, since {holder.get('since')}, lease expires {holder.get('expires_at')}); "
            f"waited {self.settings.timeout_s:g}s (OUTPOST_STORE_LOCK_TIMEOUT_S). Retry later.",
            path=str(self.directory), host=holder.get("host"), pid=holder.get("pid"), since=holder.get("since"),
        )

    # -- while held ----------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                self._renew()
            except OSError as exc:
                # An NFS hiccup: keep trying until the lease expires; check() reports a takeover.
                log.warning("%s: lease renewal failed: %s", self.directory, exc)
            if self._lost:
                return

    def _renew(self) -> None:
        current = read_lease(self.directory)
        if current is None or current.get("token") != self.token:
            self._lost = f"the lease is now {current!r}"
            log.error("%s: writer lease lost: %s", self.directory, self._lost)
            return
        tmp = self.lease_path.with_name(f"{LEASE_NAME}.{self.token}.renew")
        tmp.write_bytes(self._record())
        os.replace(tmp, self.lease_path)

    def check(self) -> None:
        """Raise LeaseLostError unless the lease file still names this writer."""
        current = read_lease(self.directory)
        if self._lost is None and (current is None or current.get("token") != self.token):
            self._lost = f"the lease is now {current!r}"
        if self._lost is not None:
            raise LeaseLostError(f"{self.directory}: this writer's lease was taken over ({self._lost}); "
                                 "nothing was published, retry")

    # -- release -------------------------------------------------------------------------------
    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        current = read_lease(self.directory)
        if current is not None and current.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.lease_path.unlink()
        self._release_fcntl()

    def _release_fcntl(self) -> None:
        if self._fcntl_fd is not None:
            os.close(self._fcntl_fd)  # closing drops the POSIX lock
            self._fcntl_fd = None


def read_lease_at(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"expires": 0.0}
    return obj if isinstance(obj, dict) else {"expires": 0.0}


# Per-process state: POSIX locks belong to the process, so threads queue on a thread lock first.
_registry_lock = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}
_held: dict[str, tuple[int, int, WriterLease]] = {}


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike[str], settings: LockSettings | None = None) -> Iterator[WriterLease]:
    """Hold the writer lock of ``directory`` for the body; yield the ``WriterLease``.

    Waits up to ``settings.timeout_s`` (default: ``LockSettings.from_env()``), then raises
    StoreBusyError (retryable) naming the holder. Re-entrant within a thread. The lease is renewed
    in the background while held and released on exit, also when the body raises; a writer
    killed while holding it leaves a lease that expires after ``ttl_s`` (at once for a dead
    process on the same host).
    """
    settings = settings or LockSettings.from_env()
    path = Path(directory).resolve()
    key = str(path)
    me = threading.get_ident()
    with _registry_lock:
        held = _held.get(key)
        if held is not None and held[0] == me:
            _held[key] = (me, held[1] + 1, held[2])
            reentered = held[2]
        else:
            reentered = None
        tlock = _thread_locks.setdefault(key, threading.Lock())
    if reentered is not None:
        try:
            yield reentered
        finally:
            with _registry_lock:
                owner, depth, lease = _held[key]
                _held[key] = (owner, depth - 1, lease)
        return

    deadline = time.time() + settings.timeout_s
    if not tlock.acquire(timeout=max(0.0, deadline - time.time())):
        with _registry_lock:
            other = _held.get(key)
        holder = other[2] if other else None
        raise StoreBusyError(
            f"{path}: another thread of this process (host {settings.host!r}, pid {os.getpid()}) holds the writer "
            f"lock; waited {settings.timeout_s:g}s (OUTPOST_STORE_LOCK_TIMEOUT_S). Retry later.",
            path=key, host=settings.host, pid=os.getpid(), since=_iso(holder.since) if holder else None,
        )
    try:
        lease = WriterLease(path, settings)
        lease.acquire(deadline)
        with _registry_lock:
            _held[key] = (me, 1, lease)
        try:
            yield lease
        finally:
            with _registry_lock:
                del _held[key]
            lease.release()
    finally:
        tlock.release()
