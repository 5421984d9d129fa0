"""In-region triggers (``triggers = "local"``): deferred tasks wait on this worker, not on the central triggerer.

* :mod:`~airflow_outpost.worker.triggers.runner`: the child process that runs the triggers, one
  asyncio loop for all of them (as Airflow's triggerer does), so a misbehaving trigger can block
  only that loop, never the worker's own.
* :mod:`~airflow_outpost.worker.triggers.host`: the worker's side: starts and restarts that child,
  hands it triggers, keeps each waiting task's try alive on the control plane (heartbeats with
  the identity of the try's first task process), enforces ``trigger_timeout`` and
  ``max_local_triggers``, and tells the job runner how each wait ended.

The egress gateway answers the task's deferral request itself instead of forwarding it, so the
trigger's class path and kwargs never leave the worker; the job runner then resumes the task in a
new task process on the same try (the gateway replays the try's start and gives the Task SDK the
``next_method``/``next_kwargs`` Airflow's own resume would).
"""

from airflow_outpost.worker.triggers.host import Deferral, LocalTriggers, WaitEnd

__all__ = ["Deferral", "LocalTriggers", "WaitEnd"]
