"""Where the egress gateway listens across restarts, and whether that may be trusted.

``gateway.json`` in the state folder holds the gateway's loopback port and its secret path prefix
(:func:`airflow_outpost.worker.egress.admission.new_prefix`): with ``crash_policy = adopt`` a
restarted worker serves the very URL its adopted task processes were given. A fresh state folder
has none, so its worker gets a fresh port and a fresh prefix.

The file decides where the tokens of adopted task processes go, so a restarted worker trusts it
only if it is a regular file (not a link) owned by the worker's user with no group or other
permission bits, in a state folder of that user's that no other user may write
(:func:`read_record`). Otherwise it is ignored, said in an error, and this run's gateway gets a
fresh port and prefix; recovery then stops the task processes that still use the old URL and
reports their tries failed.

:func:`listener_uid` says which user listens on a loopback TCP port (``/proc/net/tcp`` and
``tcp6``): when the recorded port cannot be bound again, the worker tells "another user took it"
(which receives adopted task processes' tokens) from "something of ours still holds it".
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from airflow_outpost.worker.egress.admission import is_prefix
from airflow_outpost.worker.runtime.state import write_json_atomic

FILE_NAME = "gateway.json"
_LISTEN = "0A"
# Local addresses (as /proc/net/tcp{,6} print them) whose listener receives connections to 127.0.0.1.
_COVERS_LOOPBACK = {"0100007F", "00000000", "00000000000000000000000000000000", "0000000000000000FFFF00000100007F"}


@dataclass(frozen=True)
class GatewayRecord:
    """The gateway's address of a previous run: its port and its secret path prefix."""

    port: int
    prefix: str


def read_record(state_folder: Path) -> tuple[GatewayRecord | None, str | None]:
    """``(record, None)`` for a trusted ``gateway.json``; ``(None, None)`` when there is none or
    it is unreadable or of an older version (no prefix); ``(None, why)`` when it exists but must
    not be trusted (see the module docstring). Never raises."""
    path = Path(state_folder) / FILE_NAME
    uid = os.getuid()
    try:
        folder = os.stat(path.parent)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as exc:  # ELOOP: a symbolic link
        return None, f"{path} cannot be opened as a plain file ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if folder.st_uid != uid or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None, (f"its folder {path.parent} is owned by uid {folder.st_uid} with mode "
                          f"{stat.S_IMODE(folder.st_mode):o}; it must be uid {uid}'s and writable by it alone")
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            return None, (f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
                          f"it must be a file of uid {uid} with mode 0600")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = json.loads(fh.read(4096))
    except (OSError, ValueError):
        return None, None
    finally:
        os.close(fd)
    port = data.get("port") if isinstance(data, dict) else None
    prefix = data.get("prefix") if isinstance(data, dict) else None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536 or not is_prefix(prefix):
        return None, None
    return GatewayRecord(port, str(prefix)), None


def save_record(state_folder: Path, record: GatewayRecord) -> None:
    """Write ``gateway.json`` durably, 0600 (:func:`write_json_atomic` makes it with ``mkstemp``)."""
    write_json_atomic(Path(state_folder) / FILE_NAME, {"port": record.port, "prefix": record.prefix})


def listener_uid(port: int, proc_net: Path = Path("/proc/net")) -> int | None:
    """The uid of the process that listens on ``127.0.0.1:port`` (or on a wildcard address that
    covers it), from ``/proc/net/tcp`` and ``tcp6``; ``None`` if none is found (or not Linux)."""
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != _LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if address.upper() in _COVERS_LOOPBACK and int(hex_port, 16) == port:
                return int(fields[7])
    return None
