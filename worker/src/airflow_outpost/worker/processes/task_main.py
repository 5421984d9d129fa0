"""Task processes: ``python -m airflow_outpost.worker.processes.task_main [--zygote]``.

Zygote mode (the default launcher): one long-lived process imports the Task SDK, what the task
runner needs and the worker's ``preload`` modules, freezes those objects out of garbage collection
(``gc.freeze``, so children keep sharing their pages), then forks one child per task on request, so
a fetched task starts in milliseconds with everything already imported. Protocol, one JSON object per line:

* worker -> zygote (stdin): ``{"id", "workload", "server", "env", "output", "deadline"}``; a child
  forked after ``deadline`` (``time.time()``: the worker's launch timed out) exits with
  ``LATE_START_EXIT`` before it runs anything
* zygote -> worker (stdout): ``{"event": "ready"}``, ``{"event": "started", "id", "pid"}``,
  ``{"event": "exit", "id", "pid", "code"}`` (``code`` negative for a signal, as in ``subprocess``)

Each child starts a new session (so signals can reach its whole tree), sends its output to the
given file, applies the per-task environment and runs the task through the Task SDK's
``supervise_task``, with a client that sends the task token only while the worker's uid listens on
the gateway port (``OUTPOST_GATEWAY_UID``, :mod:`airflow_outpost.worker.processes.gateway_client`).
EOF on stdin makes the zygote exit once its children have.

With the worker's ``memory_merge`` setting (``OUTPOST_MEMORY_MERGE=1``, read once and removed
from the environment tasks see) each child opts itself in to the kernel's samepage merging before it
runs the task; the zygote does not.

Single mode (no ``--zygote``, used with ``prewarm = 0``) reads one request line and runs it in
this process: a fresh interpreter per task, for users who want no shared parent at all.

Each request may name an ``exit_file``: when ``supervise_task`` returns, the task process records
its exit code there atomically (:func:`airflow_outpost.worker.runtime.state.record_exit`), so the outcome is known even
if no worker is running at that moment. A process killed before that records nothing, which the
worker reads as "outcome unknown" and reports failed.

What happens when the worker dies depends on ``OUTPOST_CRASH_POLICY`` (the worker's
``crash_policy``, read once at start and removed from the environment tasks see):

* ``stop`` (default): the kernel signals the worker's direct children (``PR_SET_PDEATHSIG``): the
  zygote exits, and each task child, losing its parent, SIGKILLs its task's process tree, so the
  Task SDK supervisor, still alive, reports the task failed and exits. A task never runs on
  unsupervised (the Task SDK's own SIGTERM handling only calls ``on_kill()`` and lets the task go
  on).
* ``adopt``: nothing is signalled. Task children run on under their Task SDK supervisor, which
  keeps talking to the worker's gateway port (a restarted worker binds it again and takes them
  over). The zygote notices EOF on stdin, forks nothing more, and exits once its children have,
  staying their reaper and the subreaper of their orphans until then; its event stream to the dead
  worker is dropped.

Run as the worker's ``task_user`` (through ``sudo``, which stays between the worker and this
process and does not die with the worker), the parent-death signal is tied to ``sudo``, so with
``stop`` a zygote also exits when its stdin reaches EOF (the worker is gone), and a single-mode task
process watches the worker's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from airflow_outpost.worker.processes import memory_merge
from airflow_outpost.worker.runtime.file_modes import TASK_UMASK

PR_SET_PDEATHSIG = 1
_job_started = False
# Exit code of a task process forked after its launch timed out (EX_TEMPFAIL): it ran nothing.
LATE_START_EXIT = 75
# Read once by zygote_main/single_main; forked children inherit it.
_adopt = False
_merge = False  # OUTPOST_MEMORY_MERGE, read once at start (see _merge_memory)
_via_sudo = False  # OUTPOST_VIA_SUDO: started as the worker's task_user, sudo between us and the worker


def kill_descendants(sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to every descendant of this process; return how many were signalled."""
    import psutil

    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(sig)
            count += 1
        except psutil.NoSuchProcess:
            pass
    return count


def _on_parent_death(signum: int, frame: object) -> None:
    kill_descendants()
    if not _job_started:
        os._exit(0)
    # Otherwise return: the supervisor sees its task die and reports the failure before exiting.


def _zygote_on_parent_death(signum: int, frame: object) -> None:
    # Exit only: each task child then gets its own parent-death signal and stops its task tree
    # while its supervisor survives to report the failure.
    os._exit(0)


def _die_with_parent(expected_parent: int, handler: Any = _on_parent_death) -> None:
    signal.signal(signal.SIGUSR1, handler)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker's crash recovery stops leftovers
        return
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        handler(signal.SIGUSR1, None)


def _preload() -> None:
    """Import what the forked task runner needs, so each task inherits it ready-made."""
    import importlib

    for module in (
        "airflow.executors.workloads",
        "airflow.sdk.execution_time.supervisor",
        "airflow.sdk.execution_time.callback_supervisor",
        "airflow.sdk.execution_time.task_runner",
        "airflow.dag_processing.bundles.manager",
        "airflow.dag_processing.dagbag",
        "airflow.providers.standard.decorators.python",
        "airflow.providers.standard.operators.python",
        "psutil",
        "airflow_outpost.worker.runtime.state",
        "airflow_outpost.worker.processes.gateway_client",
    ):
        try:
            importlib.import_module(module)
        except ImportError:  # optional providers may be absent on a worker
            pass
    # The Task SDK's client builds its SSL context (the CA bundle: ~80 ms) once per process and
    # caches it; built here, every forked task starts with it.
    try:
        from airflow.sdk.api.client import Client

        # It may log ("Using Public CAs"); the zygote's stdout is its channel to the worker.
        with contextlib.redirect_stdout(sys.stderr):
            Client(base_url="http://127.0.0.1/", token="").close()
    except Exception as exc:  # noqa: BLE001 - a Task SDK without that client: each task builds its own
        print(f"outpost: could not prebuild the Task SDK client's SSL context: {type(exc).__name__}: {exc}", file=sys.stderr)
    # The worker's `preload` setting: what the DAGs import. A module that fails to import is said
    # in the zygote's log and skipped (each task then imports it itself, and fails there if it must).
    for module in filter(None, os.environ.pop("OUTPOST_PRELOAD", "").split(",")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any error in third-party import code
            print(f"outpost: preload {module!r} failed, tasks import it themselves: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


def _read_memory_merge() -> None:
    global _merge
    _merge = os.environ.pop("OUTPOST_MEMORY_MERGE", "") == "1"


def _merge_memory() -> None:
    """With the worker's ``memory_merge`` setting: opt this task's supervisor, and so the task
    process it forks, in to the kernel's samepage merging
    (:mod:`airflow_outpost.worker.processes.memory_merge`). Called in each task child, not in the
    zygote: ksmd then has nothing of ours to scan while no task runs. The worker checked at start
    that the kernel allows it; a refusal here is said in the task's output and it runs unmerged."""
    if not _merge:
        return
    try:
        memory_merge.enable()
    except OSError as exc:
        print(f"outpost: memory_merge: {exc}; this task runs without it", file=sys.stderr)


def _freeze() -> None:
    """Keep what this process has made out of every later garbage collection (``gc.freeze``).

    A forked process shares its parent's pages until it writes to them, and a collection writes
    to the header of every object it examines: without this, the first full collection in a task
    process copies nearly every page the zygote imported into it.
    """
    gc.collect()
    gc.freeze()


def run_request(msg: dict[str, Any]) -> int:
    """Run one workload request in this process; return the Task SDK's exit code."""
    global _job_started
    _job_started = True
    os.environ.update({k: str(v) for k, v in (msg.get("env") or {}).items()})
    if msg["workload"].get("type") == "ExecuteCallback":
        return _run_callback(msg)
    from airflow.executors.workloads import ExecuteTask

    supervise_task = _supervise_task()
    workload = ExecuteTask.model_validate(msg["workload"])
    try:
        from setproctitle import setproctitle

        ti = workload.ti
        setproctitle(f"outpost task: {ti.dag_id}.{ti.task_id} run={ti.run_id} map={ti.map_index} try={ti.try_number}")
    except ImportError:
        pass
    extra: dict[str, Any] = {}
    if "sentry_integration" in inspect.signature(supervise_task).parameters:  # Task SDK 1.2 and later
        extra["sentry_integration"] = getattr(workload, "sentry_integration", "")
    with _gateway_client(msg["server"], workload.token) as client:
        return int(supervise_task(
            # The DTO duck-types as the SDK TaskInstance, as in Airflow's own executors.
            ti=workload.ti,
            bundle_info=workload.bundle_info,
            dag_rel_path=workload.dag_rel_path,
            token=workload.token,
            server=msg["server"],
            log_path=workload.log_path,
            **({"client": client} if client is not None else {}),
            **extra,
        ))


@contextlib.contextmanager
def _gateway_client(server: str, token: str) -> Iterator[Any]:
    """The Task SDK client to use: one that checks the gateway's listener
    (:mod:`airflow_outpost.worker.processes.gateway_client`) when the worker named its uid, else
    ``None`` (the Task SDK builds its own for ``server``). Closed on exit."""
    from airflow_outpost.worker.processes.gateway_client import checked_client, gateway_uid_from_env

    uid = gateway_uid_from_env()
    if uid is None:
        yield None
        return
    client = checked_client(server, token, uid)
    try:
        yield client
    finally:
        client.close()


def _supervise_task() -> Any:
    """The Task SDK's task supervisor: ``supervise_task`` (Task SDK 1.3), ``supervise`` before."""
    from airflow.sdk.execution_time import supervisor

    return getattr(supervisor, "supervise_task", None) or supervisor.supervise


def _run_callback(msg: dict[str, Any]) -> int:
    """Run a deadline alert's callback through the Task SDK's ``supervise_callback``; 0 on success.

    The supervisor forks the callback, which imports ``data["path"]`` (from the DAG bundle when it
    lives in a DAG file) and calls it with ``data["kwargs"]``; a callback that raises makes the
    supervisor raise, which is exit code 1 here (and the job is reported failed).
    """
    from airflow.executors.workloads import ExecuteCallback

    try:
        from airflow.sdk.execution_time.callback_supervisor import supervise_callback
    except ImportError:
        # Task SDK 1.2 (Airflow 3.2) has none; a stock 3.2 scheduler never hands callbacks to
        # the Edge executor either (edge3 cannot queue them there), so this is a mismatched install.
        print("outpost: this Task SDK cannot run ExecuteCallback workloads (callback_supervisor is missing; "
              "it came with Task SDK 1.3 / Airflow 3.3)", file=sys.stderr)
        return 1
    workload = ExecuteCallback.model_validate(msg["workload"])
    callback = workload.callback
    try:
        from setproctitle import setproctitle

        # "outpost task:" is what crash recovery recognises a task process by.
        setproctitle(f"outpost task: callback {callback.data.get('path', '')} id={callback.id}")
    except ImportError:
        pass
    try:
        with _gateway_client(msg["server"], workload.token) as client:
            supervise_callback(
                id=callback.id,
                callback_path=callback.data.get("path", ""),
                callback_kwargs=callback.data.get("kwargs") or {},
                dag_rel_path=workload.dag_rel_path,
                log_path=workload.log_path,
                bundle_info=workload.bundle_info,
                token=workload.token,
                server=msg["server"],
                **({"client": client} if client is not None else {}),
            )
    except RuntimeError as exc:  # "Callback subprocess exited with code N": the callback failed
        print(f"outpost: callback {callback.data.get('path')} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _record_exit(msg: dict[str, Any], code: int) -> None:
    """Record ``code`` in the request's exit file, if it names one (see the module docstring)."""
    if not msg.get("exit_file"):
        return
    from airflow_outpost.worker.runtime.state import record_exit

    try:
        record_exit(msg["exit_file"], code)
    except OSError as exc:  # a live worker still gets the code from the zygote / wait(); say why here
        print(f"outpost: could not record exit code {code} in {msg['exit_file']}: {exc}", file=sys.stderr)


def _child(msg: dict[str, Any], zygote_pid: int, close_fds: list[int]) -> None:
    """In a forked child: detach, redirect output, run the task, record its exit code, never return."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The zygote's parent-death handler (inherited) must not end a task child.
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        for fd in close_fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        out = os.open(msg["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        # Re-point the descriptors only: new file objects on fd 1/2 would close them when
        # garbage-collected, after the Task SDK has re-pointed those fds at its own sockets.
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        if (deadline := msg.get("deadline")) is not None and time.time() > deadline:
            # The worker gave up on this launch and failed the job: running it now would run it twice.
            print(f"outpost: this task process started {time.time() - deadline:.1f}s after its launch timed out; "
                  "the worker failed the job then, so the task is not run here", file=sys.stderr, flush=True)
            os._exit(LATE_START_EXIT)
        if not _adopt:
            _die_with_parent(zygote_pid)
        gc.freeze()  # the supervisor forks the task process from here: the same reasoning as in the zygote
        _merge_memory()
        code = run_request(msg)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            _record_exit(msg, code)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


PR_SET_CHILD_SUBREAPER = 36


def _sweep_orphans(running: dict[int, str]) -> None:
    """Kill adopted orphans that belong to no running task.

    As a child subreaper the zygote inherits processes whose parent died inside a task's tree.
    One whose session is a running task's (session id == that task's pid) is left alone (a
    double-forked helper of a live task); any other is left over from a finished task.
    """
    import psutil

    for proc in psutil.Process().children():
        if proc.pid in running:
            continue
        try:
            if os.getsid(proc.pid) not in running:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def _read_policy() -> None:
    global _adopt, _via_sudo
    _adopt = os.environ.pop("OUTPOST_CRASH_POLICY", "stop") == "adopt"
    _via_sudo = os.environ.pop("OUTPOST_VIA_SUDO", "0") == "1"


def _parent() -> tuple[int, int]:
    """(the process whose death means the worker's, the worker's pid). Under ``sudo`` (the
    worker's ``task_user``) the former is ``sudo``, this process's parent."""
    worker = int(os.environ.pop("OUTPOST_PARENT_PID", os.getppid()))
    return (os.getppid() if _via_sudo else worker), worker


def _watch_worker(worker: int) -> None:
    """Under ``sudo``: a thread that acts as the parent-death signal would once ``worker`` is gone."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                _on_parent_death(signal.SIGUSR1, None)
                os._exit(1)
            except PermissionError:  # alive, another user's
                pass

    threading.Thread(target=watch, name="worker watch", daemon=True).start()


def zygote_main() -> int:
    os.umask(TASK_UMASK)  # logs 0640, folders 0750: the log folder's group may read them
    _read_policy()
    _read_memory_merge()
    parent, _ = _parent()
    if not _adopt:
        _die_with_parent(parent, _zygote_on_parent_death)
    try:  # orphans of task trees are re-parented to us (and reaped) instead of init
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    _preload()
    _freeze()
    me = os.getpid()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from imported code must not corrupt the protocol stream

    worker_gone = False

    def send(obj: dict[str, Any]) -> None:
        nonlocal worker_gone
        if worker_gone:
            return
        try:
            out.write(json.dumps(obj) + "\n")
        except OSError:  # the worker died (crash_policy adopt): keep reaping, stop reporting
            worker_gone = True

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd fires
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    children: dict[int, str] = {}
    buffer = b""
    stdin_open = True
    send({"event": "ready", "pid": os.getpid()})
    while stdin_open or children:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "wake":
                os.read(wake_r, 4096)
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                if not _adopt and _via_sudo:
                    # sudo outlives the worker: EOF is the only sign it died (see the module docstring).
                    _zygote_on_parent_death(signal.SIGUSR1, None)
                stdin_open = False
                sel.unregister(sys.stdin.fileno())
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                msg = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(msg, me, [wake_r, wake_w, out.fileno()])
                children[pid] = msg["id"]
                send({"event": "started", "id": msg["id"], "pid": pid})
        _sweep_orphans(children)
        while True:  # reap every child that has exited: our tasks and adopted orphans
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                send({"event": "exit", "id": children.pop(pid), "pid": pid, "code": os.waitstatus_to_exitcode(status)})
    return 0


def single_main() -> int:
    os.umask(TASK_UMASK)  # logs 0640, folders 0750: the log folder's group may read them
    _read_policy()
    _read_memory_merge()
    parent, worker = _parent()
    if not _adopt:
        _die_with_parent(parent)
        if parent != worker:
            _watch_worker(worker)
    _preload()
    _merge_memory()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    msg = json.loads(line)
    code = 1
    try:
        code = run_request(msg)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        _record_exit(msg, code)
    return code


if __name__ == "__main__":
    sys.exit(zygote_main() if "--zygote" in sys.argv[1:] else single_main())
