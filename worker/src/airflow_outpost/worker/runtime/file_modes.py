"""Who may read what the worker writes: its umask, its task processes' umask, and its two folders.

The worker runs with umask 0077, so everything it creates is its user's alone: the state folder
(0700) with the job journal, outbox, egress ledger and its key, cost ledger, gateway and status
files (0600), and the model-service socket. Task processes run with umask 0027: their logs (0640)
and log folders (0750) are readable by the log folder's group, which ``log_group`` sets for a log
shipper (the folder is given to that group with the setgid bit, so everything created under it
inherits the group). Nothing the worker or a task writes is readable by other users.

With ``task_user`` (tasks run as another OS user) ``log_group`` is the group both users share, and
the task user reaches only what it must through it: the log folder becomes 2770 (it writes its
logs), the state folder 0710 (it may pass through, list and read nothing: every file there stays
0600 to the worker), and inside it only the folders tasks write (task output, exit codes, runner
metrics) and the region store are 2770. The worker's secret, config and keys are never shared.
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
SHARED_STATE_MODE = 0o710  # task_user: pass-through only
TASK_FOLDER_MODE = stat.S_ISGID | 0o770  # task_user: folders tasks write, the shared group's


def secure_folders(s: Settings) -> None:
    """Give the state folder mode 0700 and the log folder 0750 (0o2750 and ``log_group`` when set).

    Called at start, after the folders exist. A folder this user does not own (so cannot chmod) is
    left as it is, with a warning naming what to run; a ``log_group`` the user cannot give the log
    folder to (not a member) is a ConfigError.
    """
    log_folder = Path(s.log_folder)
    if s.log_group is None:
        _chmod(Path(s.state_folder), STATE_MODE, "state_folder")
        _chmod(log_folder, LOG_FOLDER_MODE, "log_folder")
        return
    gid = group_id("log_group", s.log_group)
    _give(log_folder, gid, s.log_group)
    if s.task_user is None:
        _chmod(Path(s.state_folder), STATE_MODE, "state_folder")
        _chmod(log_folder, stat.S_ISGID | LOG_FOLDER_MODE, "log_folder")
        return
    from airflow_outpost.worker.runtime.state import StateFolder

    _chmod(log_folder, TASK_FOLDER_MODE, "log_folder")
    _give(Path(s.state_folder), gid, s.log_group)
    _chmod(Path(s.state_folder), SHARED_STATE_MODE, "state_folder")
    state = StateFolder(s.state_folder)
    for folder in (state.output_dir, state.exits_dir, Path(s.state_folder) / "runner-metrics", s.region_store):
        folder.mkdir(parents=True, exist_ok=True)
        _give(folder, gid, s.log_group)
        _chmod(folder, TASK_FOLDER_MODE, "task_user")


def _give(folder: Path, gid: int, group: str) -> None:
    try:
        os.chown(folder, -1, gid)
    except PermissionError:
        raise ConfigError("log_group", group, f"this user (uid {os.getuid()}) must be a member of the group to "
                          f"give it {folder}") from None


def _chmod(folder: Path, mode: int, setting: str) -> None:
    try:
        if stat.S_IMODE(folder.stat().st_mode) != mode:
            folder.chmod(mode)
    except PermissionError:
        log.warning("%s %s is not this user's to restrict (it stays %o): run `chown %d %s && chmod %o %s`",
                    setting, folder, stat.S_IMODE(folder.stat().st_mode), os.getuid(), folder, mode, folder)
