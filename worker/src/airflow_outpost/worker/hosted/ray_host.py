"""Gives the worker's tasks a Ray: a persistent local head the worker owns, or an existing cluster.

Without this, each task that uses Ray starts its own local Ray (seconds) and stops it at the end,
so nothing Ray-side stays warm between tasks. With ``ray = "local"`` the worker starts
``ray start --head --block`` as its own child, on loopback (or on ``ray_node_ip_address``, where
other hosts can join it with ``ray start --address``), in its own process group, with token
auth (a fresh random token per worker run, in ``<state_folder>/ray/auth_token``, mode 0600), and
tells each task where it is: ``OUTPOST_RAY_ADDRESS``, ``RAY_AUTH_TOKEN_PATH`` and
``OUTPOST_RAY_KEEP_WARM_S``, which ``airflow_outpost.runners.batch.ray_session.RayConfig.from_env()`` reads. Named
detached actors then outlive the task that made them. With an address (``auto``, ``host:port``,
``ray://host:port``) the worker starts nothing and passes the address (and
``ray_auth_token_file`` as ``RAY_AUTH_TOKEN_PATH``) on.

The local head's output goes to ``<state_folder>/ray/ray.log``; Ray's own files go to a short
private temp dir (Ray's UNIX socket paths must stay under 107 bytes). If the head does not come
up, or dies, tasks started meanwhile get no Ray variables and start their own Ray as before,
while the head is restarted with a capped backoff. Stopping it never uses a machine-wide
``ray stop``: SIGTERM to its process group, a bounded wait, SIGKILL, then SIGKILL to any
process still marked as ours (its command line names the temp dir, or its environment carries
``OUTPOST_RAY_TEMP_DIR``: Ray's worker processes rename themselves and leave the group).
Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path

from airflow_outpost.worker.config import Settings
from airflow_outpost.worker.procutil import die_with_parent
from airflow_outpost.worker.runtime.state import write_atomic

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MAX_RESTART_DELAY_S = 60.0
HEALTHY_AFTER_S = 300.0  # a head that ran this long starts the backoff again from 1 s
PROBE_INTERVAL_S = 10.0
MARKER_ENV = "OUTPOST_RAY_TEMP_DIR"
LOOPBACK = "127.0.0.1"
# Variables the worker's Ray settings replace: an inherited value would point tasks elsewhere.
_TASK_VARS = ("OUTPOST_RAY_ADDRESS", "OUTPOST_RAY_KEEP_WARM_S")
_LOCAL_ONLY_VARS = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def temp_dir_for(state_folder: Path) -> Path:
    """``/tmp/outpost-ray-<uid>-<hash of the state folder>``: at most 40 bytes, so Ray's socket
    paths below it (``session_<date>_<pid>/sockets/plasma_store``) stay within the UNIX limit."""
    digest = hashlib.sha256(str(Path(state_folder).resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"outpost-ray-{os.getuid()}-{digest}"


def ray_available() -> bool:
    """True if Ray is installed in this interpreter (the ``runners`` extra)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except (ModuleNotFoundError, ValueError):
        return False


def _free_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on all interfaces (Ray binds its ports there), else any free port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                sock.bind(("", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port")


async def _accepts(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def marked_pids(temp_dir: Path) -> list[int]:
    """Our processes that belong to the Ray under ``temp_dir``: named in the command line or marked
    in the environment. Only this user's processes are readable, so only they are returned."""
    needle = str(temp_dir).encode()
    marker = f"{MARKER_ENV}={temp_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


class RayHost:
    """The Ray the worker gives its tasks. ``start()`` and ``aclose()`` are idempotent; ``aclose()``
    is safe before ``start()``. See the module docstring."""

    def __init__(self, ray: str, state_folder: Path, *, keep_warm_s: float, num_cpus: int | None = None,
                 num_gpus: int | None = None, auth_token_file: Path | None = None,
                 node_ip_address: str = LOOPBACK, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.local = ray == "local"
        self.node_ip_address = node_ip_address  # local: where the head is reached (Settings.ray_node_ip_address)
        self.folder = Path(state_folder) / "ray"
        self.log_path = self.folder / "ray.log"
        self._own_token_file = self.folder / "auth_token"  # the local head's, written at start
        self.token_file = self._own_token_file if self.local else auth_token_file
        self.temp_dir = temp_dir_for(state_folder)
        self.keep_warm_s = keep_warm_s
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.address: str | None = None if self.local else ray
        self.up: bool | None = None  # None: not known (address "auto", or not started)
        self.restarts = 0
        self._token = secrets.token_hex(32)
        self._proc: asyncio.subprocess.Process | None = None
        self._env: dict[str, str] = {}
        self._first: asyncio.Future[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, s: Settings) -> RayHost | None:
        if s.ray is None:
            return None
        return cls(s.ray, s.state_folder, keep_warm_s=float(s.ray_keep_warm_s or 0), num_cpus=s.ray_num_cpus,
                   num_gpus=s.ray_num_gpus, auth_token_file=s.ray_auth_token_file,
                   node_ip_address=s.ray_node_ip_address or LOOPBACK)

    # -- what tasks see ----------------------------------------------------------------------
    def scrub(self, env: dict[str, str]) -> None:
        """Remove from the base task environment what :meth:`task_env` decides per task."""
        for name in _TASK_VARS + (_LOCAL_ONLY_VARS if self.local else ()):
            env.pop(name, None)

    def task_env(self) -> dict[str, str]:
        """Ray variables for a task starting now; empty while the local head is down, so the task
        starts its own Ray instead of failing to reach ours."""
        if self.local and not self.up:
            return {}
        keep = int(self.keep_warm_s) if float(self.keep_warm_s).is_integer() else self.keep_warm_s
        env = {"OUTPOST_RAY_ADDRESS": str(self.address), "OUTPOST_RAY_KEEP_WARM_S": str(keep)}
        if self.token_file is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(Path(self.token_file).resolve())
        return env

    def describe(self) -> dict[str, object]:
        """For ``status.json`` and ``/metrics``."""
        return {"mode": "local" if self.local else "cluster", "address": self.address, "up": self.up,
                "restarts": self.restarts, "log": str(self.log_path) if self.local else None}

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, env: dict[str, str]) -> None:
        """Start the local head (or the reachability probe of a cluster) in the background.
        ``env`` is the environment Ray's processes get (tasks' Ray code runs in them)."""
        if self._task is not None or self._closed:
            return
        self._first = asyncio.get_running_loop().create_future()
        if not self.local:
            self._task = asyncio.create_task(self._probe_cluster(), name="ray cluster probe")
            return
        self._env = {k: v for k, v in env.items() if k not in _LOCAL_ONLY_VARS}
        self._env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self._token, MARKER_ENV: str(self.temp_dir),
                          # The worker drains its tasks before it stops Ray: nothing to wait for.
                          "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        write_atomic(self._own_token_file, (self._token + "\n").encode())  # mkstemp: mode 0600
        if self.node_ip_address != LOOPBACK:
            log.warning("the worker's Ray head advertises %s: hosts that reach it and hold the token in %s can join "
                        "it and run code as this user; Ray's traffic, the token included, is not encrypted "
                        "(README \"Warm Ray\")", self.node_ip_address, self._own_token_file)
        self._task = asyncio.create_task(self._supervise(), name="ray head")

    async def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait for the first start attempt (bounded). False: logged; tasks start their own Ray."""
        if self._first is None:
            return False
        timeout_s = self.start_timeout_s + STOP_TIMEOUT_S if timeout_s is None else timeout_s
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._first), timeout_s)
        except TimeoutError:
            ok = False
        if not ok and self.local:
            log.error("the worker's Ray head is not up (see %s); tasks start their own Ray until it is, "
                      "and the worker keeps trying to start it", self.log_path)
        return ok

    async def aclose(self) -> None:
        """Stop the head (only its own processes) and remove its temp dir; safe twice."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.local and self._proc is not None:
            await self._stop_processes()
            self._proc = None
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.up = False if self.local else None

    # -- local head --------------------------------------------------------------------------
    def _first_result(self, ok: bool) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(ok)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 1.0
        if (stale := await self._kill_marked()):
            log.warning("stopped %d leftover process(es) of this worker's previous Ray head", stale)
        while True:
            began = loop.time()
            try:
                self._prepare_temp_dir(fresh=self.restarts == 0)
                proc = await self._spawn()
                ok = await self._wait_port()
            except OSError as exc:
                log.error("cannot start the worker's Ray head: %s", exc)
                ok = False
            self._first_result(ok)
            if ok:
                self.up = True
                log.info("Ray for tasks at %s (pid %d, log %s)%s", self.address, proc.pid, self.log_path,
                         f", restart {self.restarts}" if self.restarts else "")
                code = await proc.wait()
                self.up = False
                log.error("the worker's Ray head exited with code %s: %s", code, self._log_tail())
            elif self._proc is not None and self._proc.returncode is None:
                log.error("the worker's Ray head did not listen on %s within %.0fs: %s", self.address,
                          self.start_timeout_s, self._log_tail())
            elif self._proc is not None:
                log.error("the worker's Ray head exited at start with code %s: %s", self._proc.returncode, self._log_tail())
            await self._stop_processes()
            if loop.time() - began >= HEALTHY_AFTER_S:
                delay = 1.0
            log.warning("restarting the worker's Ray head in %.0fs; until then tasks start their own Ray", delay)
            await asyncio.sleep(delay)
            delay = min(MAX_RESTART_DELAY_S, delay * 2)
            self.restarts += 1

    def _prepare_temp_dir(self, *, fresh: bool) -> None:
        """A private dir of ours: never follow or reuse one someone else made at that path."""
        try:
            os.mkdir(self.temp_dir, 0o700)
            return
        except FileExistsError:
            pass
        st = os.lstat(self.temp_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(f"{self.temp_dir} exists and is not a directory of this user; remove it")
        os.chmod(self.temp_dir, 0o700)
        if fresh:  # files of an earlier worker run, whose processes are gone
            for child in self.temp_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.port = _free_port(self.port)  # the same port after a restart, if still free
        self.address = f"{self.node_ip_address}:{self.port}"
        cmd = [sys.executable, "-P", "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", self.node_ip_address, "--port", str(self.port),
               # Defaults 10001 and 8265 would collide with another Ray on this machine.
               "--ray-client-server-port", str(_free_port()), "--dashboard-port", str(_free_port()),
               "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.temp_dir),
               "--num-gpus", str(self.num_gpus or 0)]
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, env=self._env, stdout=out, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)
        return self._proc

    async def _wait_port(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while loop.time() < deadline:
            if self._proc is None or self._proc.returncode is not None:
                return False
            if await _accepts(self.node_ip_address, self.port or 0):
                # Someone else may hold the port (then Ray's GCS cannot bind it and the head exits):
                # a head already gone is not up; one that exits later is restarted like any death.
                await asyncio.sleep(0.1)
                return self._proc.returncode is None
            await asyncio.sleep(0.25)
        return False

    async def _stop_processes(self) -> None:
        """SIGTERM to the head's process group, bounded wait, SIGKILL, then what is still marked ours."""
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                _killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            _killpg(proc.pid, signal.SIGKILL)  # members that outlived the leader
            if proc.returncode is None:
                await proc.wait()
        if (left := await self._kill_marked()):
            log.info("killed %d process(es) of the worker's Ray head that outlived it", left)

    async def _kill_marked(self) -> int:
        """SIGKILL every process still marked as this head's; wait (bounded) until they are gone."""
        pids = await asyncio.to_thread(marked_pids, self.temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        waiting = pids
        while waiting and loop.time() < deadline:
            await asyncio.sleep(0.05)
            waiting = [pid for pid in waiting if _alive(pid)]
        if waiting:
            log.error("process(es) %s of the worker's Ray head survived SIGKILL", waiting)
        return len(pids)

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_bytes()[-1500:].decode(errors="replace")
        except OSError:
            tail = ""
        return f"see {self.log_path}" + (f"; its end:\n{tail}" if tail else "")

    # -- existing cluster --------------------------------------------------------------------
    async def _probe_cluster(self) -> None:
        """Record whether the cluster's address answers (not for ``auto``, which Ray resolves)."""
        assert self.address is not None
        if self.address == "auto":
            self._first_result(True)
            return
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        while True:
            up = await _accepts(host.strip("[]"), int(port), timeout_s=5)
            if up != self.up:
                if up:
                    log.info("Ray cluster for tasks at %s answers", self.address)
                else:
                    log.warning("Ray cluster %s does not answer; tasks that use it will fail to connect", self.address)
            self.up = up
            self._first_result(True)
            await asyncio.sleep(PROBE_INTERVAL_S)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"  # a zombie is gone for our purpose
    except (OSError, IndexError):
        return False
