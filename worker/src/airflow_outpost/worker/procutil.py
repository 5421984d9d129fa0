"""Small process helpers shared by the worker's child-process owners."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the process that started it dies (Linux only).

    Used for long-lived helpers (the control plane in tests, the model service) so a killed
    worker or test run never leaves them behind.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def mark_undumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: processes of this same user can no longer read this one's
    environment, memory or open files under ``/proc`` (nor ptrace it); no core dumps. Children
    that exec get their own (dumpable) state. True if the kernel took it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False
