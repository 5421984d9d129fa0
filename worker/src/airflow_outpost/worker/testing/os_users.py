"""A second OS user on this host, for tests that look at the worker as a hostile neighbour would.

Needs root (``useradd``); the user and its group are removed on exit.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OsUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def run_python(self, script: str, *args: str, timeout_s: float = 60) -> Any:
        """Run ``python -c script args...`` (standard library only) as this user; return what it
        printed, parsed as JSON."""
        out = subprocess.run([user_python(), "-c", script, *args], user=self.uid, group=self.gid,
                             extra_groups=list(self.groups), capture_output=True, text=True, timeout=timeout_s,
                             cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"})
        if out.returncode != 0:
            raise AssertionError(f"script as {self.name} exited {out.returncode}:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout)


def user_python() -> str:
    """An interpreter another user can run: the system's, since a test venv may live in root's
    home (pyenv under /root, mode 0700)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            return candidate
    return sys.executable


@contextmanager
def open_folder(prefix: str = "outpost-") -> Iterator[Path]:
    """A new folder every user may enter (0755, as /var/lib and /var/log are), removed on exit: what
    decides access under it is the modes of what is inside, not a private temp folder around it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def os_group(prefix: str = "opt") -> Iterator[tuple[str, int]]:
    """A new system group ``(name, gid)``, removed on exit."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True, timeout=60)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)


@contextmanager
def os_user(prefix: str = "opu", groups: tuple[str, ...] = ()) -> Iterator[OsUser]:
    """A new system user with no home and no login, in ``groups`` besides its own; removed on exit."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    cmd = ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]
    if groups:
        cmd += ["--groups", ",".join(groups)]
    subprocess.run([*cmd, name], check=True, capture_output=True, timeout=60)
    try:
        pw = pwd.getpwnam(name)
        yield OsUser(name, pw.pw_uid, pw.pw_gid, tuple(grp.getgrnam(g).gr_gid for g in groups))
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)
        if any(g.gr_name == name for g in grp.getgrall()):
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)
