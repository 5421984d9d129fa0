"""A finished job's outcome: the task's own final state where the worker saw it, else the exit code.

The Task SDK's task process reports the try's final state itself (``PATCH
/execution/task-instances/{id}/state``) through the worker's egress gateway, which notes every state
the server accepted. The supervisor's exit code says much less: the task runner exits 0 after it
reported ``failed`` or ``up_for_retry``, so an exit code alone calls a failed task a success.
Logs, metrics, ``outpost status`` and the cost ledger use :attr:`Outcome.state`.

The Edge job state is reported as the task's state where the Edge executor acts on it
(``success``, ``failed``, ``up_for_retry``: edge3 turns them into the executor's success/fail
events and purges the job). Other final states (``skipped``, ``deferred``, ``up_for_reschedule``,
``removed``) are reported as ``success``, what the stock worker reports for a supervisor that
ended cleanly: the scheduler takes the task's state from the task instance, and edge3 never purges
an Edge job left in a state it does not handle.
"""

from __future__ import annotations

from dataclasses import dataclass

# Final states a task process can report (Execution API state payloads).
TASK_FINAL_STATES = frozenset({"success", "failed", "up_for_retry", "skipped", "deferred", "up_for_reschedule",
                               "removed"})
# Those the Edge executor handles when a worker reports them as the job's state.
_EDGE_HANDLED = frozenset({"success", "failed", "up_for_retry"})


@dataclass(frozen=True)
class Outcome:
    state: str  # the task's final state, or success/failed from the exit code
    edge_state: str  # what the Edge job is reported as
    source: str  # "task" (the state the task process reported) or "exit code"


def outcome(task_state: str | None, exit_code: int | None) -> Outcome:
    """The outcome of a job whose task process reported ``task_state`` (None: nothing seen) and
    ended with ``exit_code`` (None: unknown, i.e. it was killed before it could record one)."""
    if task_state in TASK_FINAL_STATES:
        return Outcome(task_state, task_state if task_state in _EDGE_HANDLED else "success", "task")
    state = "success" if exit_code == 0 else "failed"
    return Outcome(state, state, "exit code")
