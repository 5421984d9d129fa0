"""Triggers for the airflow DAGs ``outpost_defer`` and ``outpost_trigger_comms`` (importable from the dag
folder, where Airflow and the worker's trigger runner find it): one that polls a loopback HTTP server,
one that raises, ones that use the Task SDK's comms (Variables, Connections, XComs)."""
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


class ControlPlaneReadTrigger(BaseTrigger):
    """Reads a Variable and a Connection through the Task SDK (local backends first, then the
    control plane), once with the sync API from ``async def run`` and once with the async one."""

    def __init__(self, variable: str, conn_id: str) -> None:
        super().__init__()
        self.variable, self.conn_id = variable, conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.ControlPlaneReadTrigger", {"variable": self.variable, "conn_id": self.conn_id})

    async def run(self):
        from airflow.sdk import BaseHook, Variable

        value = Variable.get(self.variable)  # sync, from the loop: through greenback as in Airflow's triggerer
        conn = await BaseHook.aget_connection(self.conn_id)
        self.log.info("connection %s: login %s, password %s", self.conn_id, conn.login, conn.password)  # masked: ***
        yield TriggerEvent({"variable": value, "host": conn.host, "login": conn.login})


class XComRoundTripTrigger(BaseTrigger):
    """Sets an XCom on its own task and reads it back through the Task SDK."""

    def __init__(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> None:
        super().__init__()
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, map_index

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.XComRoundTripTrigger",
                {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "map_index": self.map_index})

    async def run(self):
        from airflow.sdk.bases.xcom import BaseXCom
        from asgiref.sync import sync_to_async

        where = {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "map_index": self.map_index}
        await sync_to_async(BaseXCom.set)(key="from_trigger", value={"set_by": "trigger", "n": 42}, **where)
        value = await sync_to_async(BaseXCom.get_one)(key="from_trigger", **where)
        yield TriggerEvent({"read_back": value})


class AssetStateStoreTrigger(BaseTrigger):
    """Sets, reads, deletes and reads again a key of an asset's state store (Task SDK 1.3 and later)."""

    def __init__(self, asset: str) -> None:
        super().__init__()
        self.asset = asset

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.AssetStateStoreTrigger", {"asset": self.asset})

    async def run(self):
        from airflow.sdk.execution_time.context import AssetStateStoreAccessor

        store = AssetStateStoreAccessor(name=self.asset)
        await store.aset("watermark", {"set_by": "trigger", "n": 7})
        value = await store.aget("watermark")
        await store.adelete("watermark")
        yield TriggerEvent({"read_back": value, "after_delete": await store.aget("watermark", default="deleted")})


class UnknownRequestTrigger(BaseTrigger):
    """Sends the Task SDK comms a request type no Task SDK defines (one a newer one might)."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.UnknownRequestTrigger", {})

    async def run(self):
        from typing import Literal

        from airflow.sdk.execution_time import task_runner
        from pydantic import BaseModel

        class GetSomethingNew(BaseModel):
            type: Literal["GetSomethingNew"] = "GetSomethingNew"

        await task_runner.SUPERVISOR_COMMS.asend(GetSomethingNew())
        yield TriggerEvent("unreachable")


class VariablePollTrigger(BaseTrigger):
    """Reads ``key`` every ``pause_s``, ``times`` times; the event holds every value it read."""

    def __init__(self, key: str, times: int = 3, pause_s: float = 0.5) -> None:
        super().__init__()
        self.key, self.times, self.pause_s = key, times, pause_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("outpost_triggers.VariablePollTrigger", {"key": self.key, "times": self.times, "pause_s": self.pause_s})

    async def run(self):
        from airflow.sdk import Variable
        from asgiref.sync import sync_to_async

        seen = []
        for _ in range(self.times):
            seen.append(await sync_to_async(Variable.get)(self.key))  # from a thread, as providers' triggers do
            await asyncio.sleep(self.pause_s)
        yield TriggerEvent(seen)
