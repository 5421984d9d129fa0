"""Triggers for the airflow DAG ``outpost_defer`` (importable from the dag folder, where Airflow and the
worker's trigger runner find it): one that polls a loopback HTTP server, one that raises."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent


class HttpFlagTrigger(BaseTrigger):
    """Polls ``url`` until it answers 200; the event's payload is the answer's JSON."""

    def __init__(self, url: str, poll_s: float = 0.3) -> None:
        super().__init__()
        self.url, self.poll_s = url, poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.HttpFlagTrigger", {"url": self.url, "poll_s": self.poll_s})

    async def run(self):
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    resp = await client.get(self.url)
                    if resp.status_code == 200:
                        self.log.info("flag is up at %s", self.url)
                        yield TriggerEvent(resp.json())
                        return
                except httpx.HTTPError as exc:
                    self.log.info("flag server not reachable yet: %s", exc)
                await asyncio.sleep(self.poll_s)


class NeverTrigger(BaseTrigger):
    """Waits forever (for trigger-timeout tests); cleanup is logged so a test can see the trigger stopped."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.NeverTrigger", {})

    async def run(self):
        while True:
            await asyncio.sleep(3600)
        yield  # pragma: no cover  (an async generator)

    async def cleanup(self) -> None:
        self.log.info("never-trigger stopped")


class BrokenTrigger(BaseTrigger):
    """Raises after a moment."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.BrokenTrigger", {})

    async def run(self):
        await asyncio.sleep(0.2)
        raise RuntimeError("deliberate trigger failure from outpost_triggers")
        yield  # pragma: no cover


class MissingTrigger(BaseTrigger):
    """Serialises to a class path that no worker can import."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_no_such_module.GoneTrigger", {})

    async def run(self):  # pragma: no cover  (never built)
        yield TriggerEvent(None)


class KillerTrigger(BaseTrigger):
    """Kills the process it runs in (a trigger runner must survive it, up to a point)."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.KillerTrigger", {})

    async def run(self):
        import os

        await asyncio.sleep(0.2)
        os._exit(3)
        yield  # pragma: no cover
