"""The worker process itself: the composition root and what it owns for the life of the process.

Nothing is imported here: task processes import :mod:`.state` (exit records) and must not pay
for the worker's own imports. ``from airflow_outpost.worker.runtime.worker import Worker``.

* :mod:`.worker`: ``Worker``, which registers, heartbeats, fetches jobs and declares start/stop order.
* :mod:`.registration`: the version checks and the register at start (a crashed incarnation signed off).
* :mod:`.heartbeat`: heartbeats, and what the reply or a local ``outpost maintenance`` asks.
* :mod:`.status_file`: ``status.json``, what ``outpost status`` and the next start read.
* :mod:`.task_env`: the environment task processes and the worker's services start with.
* :mod:`.job_runner`: ``JobRunner`` runs fetched jobs: validate, launch, report running, wait, report.
* :mod:`.job_table`: ``RunningJob`` and the ``JobTable`` of running jobs the runner's parts share.
* :mod:`.adoption`: carries out recovery's decisions on the previous process's jobs (adopt, report, leave).
* :mod:`.trigger_waits`: tasks waiting on a local trigger: the wait, the slot, the resume.
* :mod:`.drain`: waiting for, then stopping the running jobs at shutdown.
* :mod:`.outbox`: the durable, ordered outbox of every report owed to the control plane.
* :mod:`.recovery`: what a restarted worker does with the jobs its previous process left.
* :mod:`.state`: the state folder: the lock, the job journal, exit records and ``status.json``.
* :mod:`.lifecycle`: exit when idle, drain fast on a preemption notice, warm models at start.
"""
