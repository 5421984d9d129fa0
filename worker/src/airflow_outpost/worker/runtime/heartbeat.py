"""The worker's heartbeat: its state to the control plane, and what the reply (or the operator on
this host) asks of it: queues, concurrency, maintenance, shutdown.

:class:`Heartbeat` keeps that on the :class:`~.link.ControlPlaneLink`: an unreachable server marks
the link away (running tasks continue, fetching pauses); a server that forgot the worker gets a
register again; a version refusal or a shutdown request drains the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_outpost.worker.errors import ConnectError, NotFoundError, ServerError, VersionMismatchError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings
    from airflow_outpost.worker.edge.client import EdgeClient
    from airflow_outpost.worker.runtime.link import ControlPlaneLink
    from airflow_outpost.worker.runtime.state import StateFolder

log = logging.getLogger(__name__)


class Heartbeat:
    """Sends heartbeats for ``settings.name`` and applies the replies to ``link``.

    ``state()`` is the worker state to report, ``jobs_active()`` how many jobs run, ``sysinfo()``
    and ``budget_note()`` ride along; ``draining()`` tells whether a shutdown is under way and
    ``shutdown()`` starts one; ``on_back()`` runs when the control plane is reachable again.
    """

    def __init__(self, settings: Settings, *, client: EdgeClient, link: ControlPlaneLink, state: Callable[[], str],
                 jobs_active: Callable[[], int], sysinfo: Callable[[], dict[str, Any]],
                 budget_note: Callable[[], str | None], draining: Callable[[], bool], shutdown: Callable[[], None],
                 on_back: Callable[[], None]) -> None:
        self.settings = settings
        self.client = client
        self.link = link
        self.state = state
        self.jobs_active = jobs_active
        self.sysinfo = sysinfo
        self.budget_note = budget_note
        self.draining = draining
        self.shutdown = shutdown
        self.on_back = on_back

    async def beat(self) -> bool:
        """Send one heartbeat and apply what the reply asks. Returns False if the server was unreachable."""
        s = self.settings
        state = self.state()
        try:
            # The budget note rides along as a maintenance comment (kept by the server only in
            # maintenance states) and in sysinfo["budget"] (always shown).
            comments = self.link.maintenance_comments or (self.budget_note())
            reply = await self.client.worker.set_state(s.name, state, self.jobs_active(), self.link.queues,
                                                       self.sysinfo(), comments, s.team_name)
        except (ConnectError, ServerError) as exc:
            if exc.retryable:
                if self.link.mark_unreachable():
                    log.warning("control plane unreachable (%s); running tasks continue, fetching paused", exc)
                return False
            if isinstance(exc, VersionMismatchError):
                log.error("server refuses this worker's version now: %s; draining", exc.detail)
                self.shutdown()
                return True
            if isinstance(exc, NotFoundError):
                # The server forgot us (e.g. deleted from the UI): register again.
                log.warning("control plane does not know this worker (%s); registering again", exc.detail)
                await self.client.worker.register(s.name, state, self.link.queues, self.sysinfo(), s.team_name)
                return True
            log.error("heartbeat rejected: %s", exc)
            return True
        away_s = self.link.mark_reachable()
        if away_s is not None:
            log.info("control plane reachable again after %.1fs", away_s)
            self.on_back()
        self._apply_reply(reply or {})
        return True

    def _apply_reply(self, reply: dict) -> None:
        link = self.link
        link.versions_match = bool(reply.get("versions_match", True))
        server_state = reply.get("state")
        if "queues" in reply and reply["queues"] != link.queues:
            log.info("queues changed by the control plane: %s -> %s", link.queues, reply["queues"])
            link.queues = reply["queues"]
        new_conc = reply.get("concurrency")
        if isinstance(new_conc, int) and new_conc > 0 and new_conc != link.concurrency:
            log.info("concurrency changed by the control plane: %d -> %d", link.concurrency, new_conc)
            link.concurrency = new_conc
        if server_state == "maintenance request" and not link.maintenance:
            log.info("maintenance mode requested: no new jobs until it is lifted (%s)", reply.get("maintenance_comments"))
            link.maintenance = True
        elif server_state in ("idle", "running") and link.maintenance:
            log.info("maintenance mode lifted")
            link.maintenance = False
        link.maintenance_comments = reply.get("maintenance_comments") if link.maintenance else None
        if server_state == "shutdown request" and not self.draining():
            log.info("shutdown requested by the control plane")
            self.shutdown()

    def apply_local_maintenance(self, state_folder: StateFolder) -> bool:
        """``outpost maintenance on|off`` on this host: enter or leave maintenance. True if it asked
        anything (the server is then told at the next heartbeat, which is due now)."""
        request = state_folder.take_maintenance_request()
        if request is None:
            return False
        on, comments = request
        link = self.link
        if on:
            log.info("maintenance mode requested locally: no new jobs until it is lifted (%s)", comments or "no comment")
            link.maintenance, link.maintenance_comments = True, comments or "maintenance requested on the worker host"
        elif link.maintenance:
            log.info("maintenance mode lifted locally")
            link.maintenance, link.maintenance_comments = False, None
        return True
