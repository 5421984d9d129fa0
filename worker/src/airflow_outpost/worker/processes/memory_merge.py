"""Kernel samepage merging (KSM) for task processes: the ``memory_merge`` setting.

A task's supervisor and task process are forks of the zygote, and most of what they cost is the
zygote's pages copied on first write: CPython writes reference counts into every object it
touches. Sibling tasks touch the same objects the same way, so many of those copies are
byte-for-byte alike across tasks. With ``memory_merge`` each task's supervisor opts itself in to KSM
(``prctl(PR_SET_MEMORY_MERGE)``, Linux 6.4+) as it starts, the task process it forks inherits that,
and the kernel's ``ksmd`` merges identical pages back into one copy-on-write page. The zygote and the
worker stay out, so ksmd has nothing of ours to scan while no task runs. Scanning is done by the
host's ``ksmd`` at the rate the host sets (``/sys/kernel/mm/ksm``): KSM must be running there
(``echo 1 > /sys/kernel/mm/ksm/run`` as root), which the worker never changes itself.

The opt-in is per process and ends with it; nothing else on the host is affected. Merged pages
are shared with any process on the host that opted in too (KSM's known timing side channel), so it
belongs on hosts whose tasks are one trust domain (README "Memory merging").
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
KSM_SYSFS = Path("/sys/kernel/mm/ksm")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _prctl(option: int, arg: int = 0) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(option, arg, 0, 0, 0)
    return result, ctypes.get_errno()


def unsupported_reason() -> str | None:
    """None if this kernel can opt a process in to KSM; else why not (asks, changes nothing)."""
    try:
        result, err = _prctl(PR_GET_MEMORY_MERGE)
    except (OSError, AttributeError):  # no C library prctl: not Linux
        return "prctl() is not available (not Linux)"
    if result >= 0:
        return None
    if err in (errno.EPERM, errno.EACCES):
        return (f"prctl(PR_GET_MEMORY_MERGE) was not permitted ({os.strerror(err)}): a seccomp profile or "
                f"security policy of this container or host refuses it")
    return (f"the kernel refused PR_GET_MEMORY_MERGE ({os.strerror(err)}): it needs Linux 6.4 or later "
            f"built with CONFIG_KSM (this is {os.uname().release})")


def enable() -> None:
    """Opt this process and every process it forks from now on in to KSM; OSError if refused."""
    result, err = _prctl(PR_SET_MEMORY_MERGE, 1)
    if result < 0:
        raise OSError(err, f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}")


def host_running() -> bool | None:
    """Whether the host's ``ksmd`` merges pages now (``/sys/kernel/mm/ksm/run`` is 1); None if unknown."""
    try:
        return (KSM_SYSFS / "run").read_text().strip() == "1"
    except OSError:
        return None


def host_settings() -> dict[str, str]:
    """The host's KSM tunables that decide how fast pages are merged (for benchmark records)."""
    out: dict[str, str] = {}
    for name in ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "merge_across_nodes"):
        try:
            out[name] = (KSM_SYSFS / name).read_text().strip()
        except OSError:
            pass
    return out


def merging_pages(pids: Iterable[int]) -> int:
    """Pages of ``pids`` that KSM currently backs with a merged page (``/proc/<pid>/ksm_stat``)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/ksm_stat").read_text()
        except OSError:  # gone, or a kernel without ksm_stat
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "ksm_merging_pages":
                total += int(value)
    return total


def merge_any(pid: int) -> bool:
    """Whether ``pid`` is opted in to KSM as a whole process (``ksm_merge_any: yes``)."""
    try:
        return "ksm_merge_any: yes" in Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return False
