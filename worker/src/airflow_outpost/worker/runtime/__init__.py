"""The worker process itself: the composition root and what it owns for the life of the process.

Nothing is imported here: task processes import :mod:`.state` (exit records) and must not pay
for the worker's own imports. ``from airflow_outpost.worker.runtime.worker import Worker``.

* :mod:`.worker`: ``Worker``, which registers, heartbeats, fetches jobs and declares start/stop order.
* :mod:`.job_runner`: ``JobRunner`` runs fetched jobs: validate, launch, report running, wait, report.
* :mod:`.outbox`: the durable, ordered outbox of every report owed to the control plane.
* :mod:`.recovery`: what a restarted worker does with the jobs its previous process left.
* :mod:`.state`: the state folder: the lock, the job journal, exit records and ``status.json``.
* :mod:`.lifecycle`: exit when idle, drain fast on a preemption notice, warm models at start.
"""
