"""Task processes: one OS process per workload, each running the Task SDK's own supervisor.

* :mod:`.launcher`: ``TaskLauncher`` starts and stops task processes (forked from a pre-warmed zygote, or
  a fresh interpreter) and hands back a ``TaskProcess`` to wait on.
* :mod:`.task_main`: the entry point those processes run (``python -m airflow_outpost.worker.processes.task_main``).
"""
