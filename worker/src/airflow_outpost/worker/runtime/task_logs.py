"""Ships task logs to the control plane as the egress policy allows (``logs = none | redacted | full``).

:class:`LogShipper` reads a job's log file from the offset the server acknowledged so far and pushes
the new part in chunks of ``push_log_chunk_size`` bytes (Edge API ``logs/push``), masked and capped
with ``logs = "redacted"``. A chunk ends at a line end where it has one and never inside a UTF-8
character; the offset advances only by what the server acknowledged, so a failed push loses nothing
and the next push resends from there. While the task runs, a chunk's partial last line waits for
the rest of it. The offset is journaled, so a worker that adopts the job after a crash resumes there
(at most a chunk is sent twice).

The final push ships the whole remainder, chunk after chunk. If it fails, what is left (path,
acknowledged offset, the note on how the task process ended) is committed to the outbox
(:meth:`Outbox.put_log_tail <airflow_outpost.worker.runtime.outbox.Outbox.put_log_tail>`) and
:meth:`LogShipper.ship_pending` ships it before the job's final state is delivered, retried with it
(:mod:`airflow_outpost.worker.runtime.reports`). A failed push never fails the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from airflow_outpost.worker.errors import OutpostError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.edge.jobs import JobKey
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.runtime.job_table import RunningJob
    from airflow_outpost.worker.runtime.outbox import Outbox
    from airflow_outpost.worker.runtime.state import StateFolder

log = logging.getLogger(__name__)


def _utf8_cut(data: bytes) -> int:
    """The longest prefix of ``data`` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing is cut
            return len(data)
        if byte >= 0xC0:  # a lead byte: whole if its sequence fits in what is left
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # not UTF-8 anyway: decoded with backslash escapes


class LogShipper:
    def __init__(self, settings: Settings, *, client: EdgeClient, egress: Egress, state_folder: StateFolder,
                 outbox: Outbox | None = None) -> None:
        self.settings = settings
        self.client = client
        self.egress = egress
        self.state_folder = state_folder
        self.outbox = outbox

    async def push(self, run: RunningJob, final: bool = False, failure: str | None = None) -> None:
        """Push what ``run``'s log gained since the last acknowledged push; with ``final``, all of it, then
        (with ``failure``) a note on how its task process ended and the tail of its supervisor's output.
        A final push that fails leaves the rest to the outbox (see the module docstring)."""
        s = self.settings
        if s.log_policy == "none":  # logs stay in the region (egress policy)
            return
        key, path, start = run.job.key, s.log_folder / run.job.log_path, run.log_offset
        note = None
        if final and failure and run.proc is not None:
            note = f"outpost: task process ended with {failure}; supervisor output:\n{run.proc.output_tail()}\n"
        pending_note = note

        def acked(offset: int, note_left: str | None) -> None:
            nonlocal pending_note
            run.log_offset, pending_note = offset, note_left

        try:
            await self._ship(key, path, run.log_offset, final=final, note=note, acked=acked)
        except OutpostError as exc:
            if not final or self.outbox is None:
                log.warning("pushing logs for %s failed: %s (retried from byte %d)", key, exc, run.log_offset)
            else:
                self.outbox.put_log_tail(key, path, run.log_offset, pending_note)
                log.warning("pushing the last logs of %s failed: %s; the rest (from byte %d) is pushed with its final "
                            "state", key, exc, run.log_offset)
        if not final and run.log_offset != start:
            # An adopting worker resumes pushing here after a crash (at most a chunk sent twice).
            try:
                self.state_folder.journal_update(key, log_offset=run.log_offset)
            except OSError as exc:
                log.warning("could not journal the pushed log offset of %s: %s", key, exc)

    async def ship_pending(self, key: JobKey) -> None:
        """Push what the outbox holds of ``key``'s log (from a failed final push), then forget it.
        Raises the push's error (what is acknowledged by then stays acknowledged). Idempotent."""
        if self.outbox is None or (tail := self.outbox.log_tail(key)) is None:
            return
        path, offset, note = tail
        if self.settings.log_policy != "none":
            outbox = self.outbox
            await self._ship(key, path, offset, final=True, note=note,
                             acked=lambda off, left: outbox.advance_log_tail(key, off, left))
        self.outbox.drop_log_tail(key)

    async def _ship(self, key: JobKey, path: Path, offset: int, *, final: bool, note: str | None,
                    acked: Callable[[int, str | None], None]) -> None:
        """Push ``path`` from ``offset`` chunk by chunk (to its end with ``final``, then ``note``),
        calling ``acked(offset, note still to push)`` after each chunk the server acknowledged."""
        s = self.settings
        redact = self.egress.redactor.redact if s.log_policy == "redacted" else None
        size = s.push_log_chunk_size
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed below; the pushes in between are awaited)
        except FileNotFoundError:
            fh = None
        try:
            while fh is not None:
                fh.seek(offset)
                data = fh.read(size)
                if not data:
                    break
                last = final and len(data) < size and not fh.read(1)
                cut = len(data) if last else data.rfind(b"\n") + 1
                if cut == 0:  # no line end in it
                    if not final and len(data) < size:
                        break  # a partial line of a running task: wait for the rest
                    cut = _utf8_cut(data) or len(data)
                text = data[:cut].decode(errors="backslashreplace").replace("\x00", "\ufffd")
                if redact:
                    # Only whole lines reach the redactor before the last piece, so it keeps no carry
                    # and a chunk resent after a failed push is masked the same way.
                    text = redact(key, text, last and note is None)
                if text:
                    await self.client.logs.push(key, text, datetime.now(UTC).isoformat())
                offset += cut
                acked(offset, note)
        finally:
            if fh is not None:
                fh.close()
        if final and note:
            await self.client.logs.push(key, redact(key, note, True) if redact else note, datetime.now(UTC).isoformat())
            acked(offset, None)
