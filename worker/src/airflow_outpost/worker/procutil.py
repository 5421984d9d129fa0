"""Small process helpers shared by the worker's child-process owners."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the process that started it dies (Linux only).

    Used for long-lived helpers (the control plane in tests, the model service) so a killed
    worker or test run never leaves them behind.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
