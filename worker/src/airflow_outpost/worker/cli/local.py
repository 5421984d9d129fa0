"""Commands for the worker running on this host: ``outpost stop`` and ``outpost maintenance``,
and how every local command finds that worker's state folder.

They talk to the worker through its state folder only (``status.json``, a request file, its pid),
like the stock ``airflow edge stop`` / ``airflow edge maintenance``. The control plane's remote
commands (``airflow edge remote-edge-worker-request-maintenance``, ``... -shutdown``) need none of
this: the worker obeys them through its heartbeat replies.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from airflow_outpost.worker.config import collect_settings
from airflow_outpost.worker.runtime.state import StateFolder

# Where a worker under systemd (StateDirectory=outpost) or in the images keeps its state: a user
# who runs `outpost status` as someone else gets this folder when their own default has no worker.
SYSTEM_STATE_FOLDER = Path("/var/lib/outpost/state")


def add_state_args(p: argparse.ArgumentParser) -> None:
    """``--state-folder`` and ``--config``: where to find the worker, as ``outpost worker`` would."""
    p.add_argument("--state-folder", default=None,
                   help="the worker's state folder (default: from --config/OUTPOST_STATE_FOLDER, else "
                        "$OUTPOST_HOME/state, else /var/lib/outpost/state)")
    p.add_argument("--config", default=None, help="the worker's TOML settings file, to read its state_folder")


def state_folder_for(args: argparse.Namespace) -> Path:
    """The state folder named by the flags, the config file or the environment; else the default
    of a worker run by this user, or, if that holds no worker, the system-wide one."""
    flags = {"state_folder": getattr(args, "state_folder", None), "config": getattr(args, "config", None)}
    named = collect_settings(flags).get("state_folder")
    if named is not None:
        return Path(named)
    own = Path(os.environ.get("OUTPOST_HOME", Path.home() / ".outpost")) / "state"
    if not (own / "status.json").exists() and (SYSTEM_STATE_FOLDER / "status.json").exists():
        return SYSTEM_STATE_FOLDER
    return own


def pid_alive(pid: Any) -> bool:
    """True if ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def is_worker_of(folder: Path, pid: Any) -> bool:
    """True if ``pid`` runs and is the outpost worker of ``folder``: it holds the folder's lock. A pid
    from a stale ``status.json`` may since belong to any process, which must not be signalled.
    Where this user cannot open the lock file, the process's command line must name outpost."""
    if not pid_alive(pid):
        return False
    lock = folder / "worker.lock"
    holder = StateFolder(folder).lock_holder()
    if holder is not None:
        return bool(holder == pid)
    if not lock.exists() or os.access(lock, os.R_OK):
        return False  # no lock, or a lock nobody holds: the worker that wrote status.json is gone
    try:
        return any("outpost" in part for part in psutil.Process(pid).cmdline())
    except psutil.AccessDenied:
        return True  # another user's process: signalling it fails anyway, and says so
    except psutil.NoSuchProcess:
        return False


def _running_worker(folder: Path) -> dict[str, Any] | None:
    status = StateFolder(folder).read_status()
    if status is None or status.get("state") == "offline" or not is_worker_of(folder, status.get("pid")):
        print(f"outpost: no running worker with state folder {folder}", file=sys.stderr)
        return None
    return status


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the worker (it drains, reports every final state and signs off); ``--wait`` waits for its exit."""
    folder = state_folder_for(args)
    status = _running_worker(folder)
    if status is None:
        return 1
    pid = status["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        print(f"outpost: not allowed to signal worker pid {pid} (it runs as another user: use sudo -u that user)",
              file=sys.stderr)
        return 1
    print(f"sent SIGTERM to worker {status['name']} (pid {pid}); it drains its {len(status.get('jobs', []))} job(s)")
    if args.wait:
        while pid_alive(pid):
            time.sleep(0.5)
        print("worker stopped")
    return 0


def cmd_maintenance(args: argparse.Namespace) -> int:
    """Enter or leave maintenance (no new jobs; running ones finish); ``--wait`` waits until it took effect."""
    on = args.state == "on"
    if on and not args.comments:
        print("outpost: --comments is required with maintenance on (the control plane's UI shows it)", file=sys.stderr)
        return 2
    folder = state_folder_for(args)
    if _running_worker(folder) is None:
        return 1
    StateFolder(folder).request_maintenance(on, args.comments)
    print(f"maintenance {args.state} requested; the worker applies it within its poll interval")
    if args.wait:
        want = "maintenance mode" if on else None
        while True:
            status = StateFolder(folder).read_status() or {}
            state = status.get("state")
            if not pid_alive(status.get("pid")):
                print("outpost: the worker exited while waiting", file=sys.stderr)
                return 1
            if (on and state == want) or (not on and not status.get("maintenance")):
                print(f"worker is {state}")
                return 0
            time.sleep(0.5)
    return 0


def add_local_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``stop`` and ``maintenance`` on the ``outpost`` sub-parsers."""
    st = sub.add_parser("stop", parents=[common], help="drain and stop the worker running on this host")
    add_state_args(st)
    st.add_argument("--wait", action="store_true", help="wait until it has exited")
    st.set_defaults(func=cmd_stop)
    mt = sub.add_parser("maintenance", parents=[common],
                        help="put the worker on this host in or out of maintenance (no new jobs)")
    mt.add_argument("state", choices=["on", "off"])
    mt.add_argument("--comments", "--comment", dest="comments", default=None, help="why (required with on)")
    add_state_args(mt)
    mt.add_argument("--wait", action="store_true",
                    help="on: wait until running jobs finished and it is in maintenance mode; off: until it left it")
    mt.set_defaults(func=cmd_maintenance)
