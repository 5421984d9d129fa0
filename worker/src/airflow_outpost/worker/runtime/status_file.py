"""``status.json``: what ``outpost status``, ``outpost stop`` and the next start read of this worker.

:class:`StatusWriter` writes it about once a second from the main loop and once at exit. The last
write says "offline" only if the sign-off reached the control plane, else "stopped", so the next
start knows the server still counts this worker active (see :mod:`.registration`). A failed write
is reported to :class:`~.loop_steps.DiskSpace` (a full disk degrades the worker) and raised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_outpost.worker.runtime.loop_steps import DiskSpace
    from airflow_outpost.worker.runtime.state import StateFolder

log = logging.getLogger(__name__)

STATUS_EVERY_S = 1.0
MERGE_EVERY_S = 10.0  # KSM's count is read from every task's pages: not at each status write


class StatusWriter:
    """Writes ``fields(state)`` to the state folder's ``status.json`` (``state`` None: the worker's
    own state now). ``write`` is rate-limited unless forced; ``write_final`` never raises."""

    def __init__(self, state_folder: StateFolder, disk: DiskSpace, fields: Callable[[str | None], dict[str, Any]]) -> None:
        self.state_folder = state_folder
        self.disk = disk
        self.fields = fields
        self._due = 0.0

    def write(self, *, force: bool = False, state: str | None = None) -> None:
        now = time.monotonic()
        if not force and now < self._due:
            return
        self._due = now + STATUS_EVERY_S
        try:
            self.state_folder.write_status(self.fields(state))
        except OSError as exc:
            self.disk.write_failed("status.json", exc)
            raise

    def write_final(self, signed_off: bool) -> None:
        """The last status: "offline" only if the sign-off reached the control plane. Otherwise
        "stopped" (not signed off), so the next start knows the server still counts this worker
        active and signs that incarnation off before registering again (edge3 answers 409 to a
        register while the name is neither offline nor unknown)."""
        try:
            self.write(force=True, state="offline" if signed_off else "stopped")
        except OSError as exc:
            log.error("could not write the final status.json: %s", exc)


class MemoryMergeStatus:
    """How much of the running tasks' memory KSM has merged; ``pids()`` are the task processes
    (their children are counted too). Re-read every ``MERGE_EVERY_S``, not at each status write."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids
        self._due = 0.0
        self._status: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        now = time.monotonic()
        if now >= self._due:
            import psutil

            from airflow_outpost.worker.processes import memory_merge

            self._due = now + MERGE_EVERY_S
            pids: list[int] = []
            for pid in self.pids():
                pids.append(pid)
                with contextlib.suppress(psutil.Error):
                    pids.extend(c.pid for c in psutil.Process(pid).children(recursive=True))
            self._status = {"ksm_running": memory_merge.host_running(),
                            "merged_mib": round(memory_merge.merging_pages(pids) * memory_merge.PAGE_SIZE / 2**20, 1)}
        return self._status
