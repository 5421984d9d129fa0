"""Ships task logs to the control plane as the egress policy allows (``logs = none | redacted | full``).

:class:`LogShipper` reads a job's log file from the offset pushed so far and pushes the new part in
chunks (Edge API ``logs/push``), masked and capped with ``logs = "redacted"``. The offset is journaled,
so a worker that adopts the job after a crash resumes there (at most a chunk is sent twice). A failed
push is logged and retried from the same offset next time; it never fails the job.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from airflow_outpost.worker.errors import OutpostError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.egress.gateway import Egress
    from airflow_outpost.worker.runtime.job_runner import RunningJob
    from airflow_outpost.worker.runtime.state import StateFolder

log = logging.getLogger(__name__)


class LogShipper:
    def __init__(self, settings: Settings, *, client: EdgeClient, egress: Egress, state_folder: StateFolder) -> None:
        self.settings = settings
        self.client = client
        self.egress = egress
        self.state_folder = state_folder

    async def push(self, run: RunningJob, final: bool = False, failure: str | None = None) -> None:
        """Push what ``run``'s log gained since the last push; with ``final`` and ``failure``, a note
        on how its task process ended and the tail of its supervisor's output."""
        s = self.settings
        if s.log_policy == "none":  # logs stay in the region (egress policy)
            return
        redact = self.egress.redactor.redact if s.log_policy == "redacted" else None
        path = s.log_folder / run.job.log_path
        chunks: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            with open(path, "rb") as fh:
                fh.seek(run.log_offset)
                data = fh.read(s.push_log_chunk_size * 8)
                run.log_offset += len(data)
            text = data.decode(errors="backslashreplace").replace("\x00", "\ufffd")
            text = redact(run.job.key, text, final and not failure) if redact else text
            chunks = [text[i:i + s.push_log_chunk_size] for i in range(0, len(text), s.push_log_chunk_size)]
        if final and failure and run.proc is not None:
            note = f"outpost: task process ended with {failure}; supervisor output:\n{run.proc.output_tail()}\n"
            chunks.append(redact(run.job.key, note, True) if redact else note)
        for chunk in chunks:
            try:
                await self.client.logs.push(run.job.key, chunk, datetime.now(UTC).isoformat())
            except OutpostError as exc:
                log.warning("pushing logs for %s failed: %s", run.job.key, exc)
                break
        if chunks and not final:
            # An adopting worker resumes pushing here after a crash (at most a chunk sent twice).
            try:
                self.state_folder.journal_update(run.job.key, log_offset=run.log_offset)
            except OSError as exc:
                log.warning("could not journal the pushed log offset of %s: %s", run.job.key, exc)
