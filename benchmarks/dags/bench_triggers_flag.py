"""The trigger of the ``bench_triggers_local`` DAG (``bench_triggers_dag.py``), in its own module in the DAG
folder so the worker's trigger runner can import it by class path (the DAG folder is on its sys.path)."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent


class FlagTrigger(BaseTrigger):
    """Polls ``url`` every ``poll_s`` until it answers 200; the event's payload is the answer's JSON."""

    def __init__(self, url: str, poll_s: float = 5.0) -> None:
        super().__init__()
        self.url, self.poll_s = url, poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("bench_triggers_flag.FlagTrigger", {"url": self.url, "poll_s": self.poll_s})

    async def run(self):
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                try:
                    resp = await client.get(self.url)
                    if resp.status_code == 200:
                        yield TriggerEvent(resp.json())
                        return
                except httpx.HTTPError as exc:
                    self.log.info("flag server not reachable: %s", exc)
                await asyncio.sleep(self.poll_s)
