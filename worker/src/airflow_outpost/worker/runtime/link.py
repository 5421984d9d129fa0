"""The worker's standing with its control plane: what the server assigned and whether it answers.

One :class:`ControlPlaneLink` per worker, shared by the parts that need it (the job runner, the
readiness check, the status file) instead of each reaching into the ``Worker``. The worker's
heartbeat is the one writer of what the server assigns; any part that fails to reach the server
may mark the link unreachable, and only a heartbeat that gets through marks it reachable again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ControlPlaneLink:
    """Queues and concurrency as the control plane last set them, maintenance, reachability."""

    queues: list[str] | None
    concurrency: int
    registered: bool = False
    versions_match: bool = True
    maintenance: bool = False
    maintenance_comments: str | None = None
    disconnected_since: float | None = None  # time.monotonic() of the first failure
    last_heartbeat: float | None = None  # time.time() of the last heartbeat that got through

    @property
    def reachable(self) -> bool:
        return self.disconnected_since is None

    def mark_unreachable(self) -> bool:
        """Count the control plane as away from now on; True if it was reachable until now."""
        if self.disconnected_since is not None:
            return False
        self.disconnected_since = time.monotonic()
        return True

    def mark_reachable(self) -> float | None:
        """A heartbeat got through: return how many seconds it was away (None if it was not)."""
        self.last_heartbeat = time.time()
        since, self.disconnected_since = self.disconnected_since, None
        return None if since is None else time.monotonic() - since

    def readiness(self, *, draining: bool) -> tuple[bool, str]:
        """``(ready, reason)`` for ``/readyz``: ready once registered and while the server answers."""
        if draining:
            return False, "draining"
        if not self.registered:
            return False, "not registered with the control plane yet"
        if self.disconnected_since is not None:
            return False, "control plane unreachable"
        return True, "ready"
