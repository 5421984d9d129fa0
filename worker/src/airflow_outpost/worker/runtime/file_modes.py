"""Who may read what the worker writes: its umask, its task processes' umask, and its two folders.

The worker runs with umask 0077, so everything it creates is its user's alone: the state folder
(0700) with the job journal, outbox, egress ledger and its key, cost ledger, gateway and status
files (0600), and the model-service socket. Task processes run with umask 0027: their logs (0640)
and log folders (0750) are readable by the log folder's group, which ``log_group`` sets for a log
shipper (the folder is given to that group with the setgid bit, so everything created under it
inherits the group). Nothing the worker or a task writes is readable by other users.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from airflow_outpost.worker.config import Settings, group_id
from airflow_outpost.worker.errors import ConfigError

log = logging.getLogger(__name__)

WORKER_UMASK = 0o077
TASK_UMASK = 0o027
STATE_MODE = 0o700
LOG_FOLDER_MODE = 0o750


def secure_folders(s: Settings) -> None:
    """Give the state folder mode 0700 and the log folder 0750 (0o2750 and ``log_group`` when set).

    Called at start, after the folders exist. A folder this user does not own (so cannot chmod) is
    left as it is, with a warning naming what to run; a ``log_group`` the user cannot give the log
    folder to (not a member) is a ConfigError.
    """
    _chmod(Path(s.state_folder), STATE_MODE, "state_folder")
    log_folder = Path(s.log_folder)
    if s.log_group is None:
        _chmod(log_folder, LOG_FOLDER_MODE, "log_folder")
        return
    gid = group_id("log_group", s.log_group)
    try:
        os.chown(log_folder, -1, gid)
    except PermissionError:
        raise ConfigError("log_group", s.log_group, f"this user (uid {os.getuid()}) must be a member of the group to "
                          f"give it {log_folder}") from None
    _chmod(log_folder, stat.S_ISGID | LOG_FOLDER_MODE, "log_folder")


def _chmod(folder: Path, mode: int, setting: str) -> None:
    try:
        if stat.S_IMODE(folder.stat().st_mode) != mode:
            folder.chmod(mode)
    except PermissionError:
        log.warning("%s %s is not this user's to restrict (it stays %o): run `chown %d %s && chmod %o %s`",
                    setting, folder, stat.S_IMODE(folder.stat().st_mode), os.getuid(), folder, mode, folder)
