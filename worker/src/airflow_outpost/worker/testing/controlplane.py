"""An embedded, throw-away Airflow 3 control plane for the demo, the tests and the benchmarks.

It runs the stock components (``airflow api-server``, ``scheduler`` and ``dag-processor``) with
the Edge executor on a SQLite metadata DB in a temporary ``AIRFLOW_HOME``, listening on
127.0.0.1 only. ``db="postgres"`` (or ``OUTPOST_TEST_DB=postgres``) puts the metadata DB on a
throw-away PostgreSQL server instead (:mod:`airflow_outpost.worker.testing.postgres`), the
database production control planes use. Nothing here is used by a production worker; it needs the ``dev`` extra
(``apache-airflow`` and ``apache-airflow-providers-edge3``).

The REST helpers (:meth:`ControlPlane.trigger`, :meth:`ControlPlane.wait_for_run`, ...) use the
public ``/api/v2`` API, which the control plane opens to everyone via
``simple_auth_manager_all_admins`` because it only listens on loopback.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from airflow_outpost.worker.errors import OutpostError
from airflow_outpost.worker.procutil import die_with_parent
from airflow_outpost.worker.testing.postgres import PostgresServer, metadata_db

TERMINAL_RUN_STATES = frozenset({"success", "failed"})


class ControlPlaneError(OutpostError):
    """The embedded control plane failed to start or answered unexpectedly."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_bin(python: str | None = None) -> str:
    # The airflow CLI that belongs to this interpreter (or `python`'s), so a venv without activation works.
    candidate = Path(python or sys.executable).with_name("airflow")
    if python is not None and not candidate.exists():
        raise ControlPlaneError(f"no 'airflow' command next to {python}")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("airflow")
    if not found:
        raise ControlPlaneError(
            "the 'airflow' command was not found: install the dev extra "
            "(pip install 'airflow-outpost[dev]') to run an embedded control plane"
        )
    return found


@dataclass
class ControlPlane:
    """A local Airflow 3 control plane with the Edge executor.

    ``start()`` blocks until the API server answers and the DAGs in ``dags_folder`` are
    parsed; ``stop()`` terminates every component and is safe to call twice or before
    ``start()``. Use it as a context manager.
    """

    dags_folder: Path
    home: Path | None = None
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # The interpreter of the venv whose Airflow to run (another Airflow line); None: this one's.
    python: str | None = None
    # The metadata DB: "sqlite" or "postgres"; None: OUTPOST_TEST_DB's, else sqlite.
    db: str | None = None
    _postgres: PostgresServer | None = field(default=None, init=False)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)
    _own_home: bool = field(default=False, init=False)
    _client: httpx.Client | None = field(default=None, init=False)

    # -- addresses --------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def edge_api_url(self) -> str:
        """The URL the stock ``airflow edge worker`` wants in ``[edge] api_url``."""
        return f"{self.base_url}/edge_worker/v1/rpcapi"

    @property
    def env(self) -> dict[str, str]:
        """Environment shared by the control plane's components (and a stock edge worker)."""
        assert self.home is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "OUTPOST_"))}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "airflow.providers.edge3.executors.EdgeExecutor",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self._postgres.url if self._postgres is not None
                else f"sqlite:///{self.home}/airflow.db",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
                "AIRFLOW__EDGE__API_ENABLED": "True",
                "AIRFLOW__EDGE__API_URL": self.edge_api_url,
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
                # Snappy scheduling: tests and benchmarks measure the worker, not scheduler sleeps.
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
                "AIRFLOW__CORE__PARALLELISM": "64",
                "AIRFLOW__EDGE__JOB_SUCCESS_PURGE": "60",
                "AIRFLOW__EDGE__HEARTBEAT_INTERVAL": "5",
                "AIRFLOW__EDGE__CHECK_WORKER_LIVENESS_INTERVAL": "5",
                "AIRFLOW__EDGE__ORPHANED_JOB_CHECK_INTERVAL": "5",
                "AIRFLOW__EDGE__JOB_FAIL_PURGE": "1",
                "AIRFLOW__EDGE__HEARTBEAT_TIMEOUT": "20",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> ControlPlane:
        """Migrate the DB and start api-server, scheduler and dag-processor; wait until ready."""
        if self._procs:
            return self
        self.db = self.db or metadata_db()
        if self.db == "postgres" and self._postgres is None:
            self._postgres = PostgresServer()
            self._postgres.start()
        if self.home is None:
            self.home = Path(tempfile.mkdtemp(prefix="outpost-airflow-"))
            self._own_home = True
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        airflow = airflow_bin(self.python)
        log_dir = self.home / "cp-logs"
        log_dir.mkdir(exist_ok=True)
        migrate = subprocess.run(
            [airflow, "db", "migrate"], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if migrate.returncode != 0:
            self.stop()
            raise ControlPlaneError(f"'airflow db migrate' failed:\n{migrate.stderr[-3000:]}")
        commands = {
            "api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.port)],
            "scheduler": [airflow, "scheduler"],
            "dag-processor": [airflow, "dag-processor"],
        }
        for name, argv in commands.items():
            self._spawn(name, argv, log_dir)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self._procs[name] = subprocess.Popen(
            argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,  # a killed test run leaves no control plane behind
        )
        log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/api/v2/version", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise ControlPlaneError(f"API server did not answer within {timeout_s:.0f}s; see {self.home}/cp-logs")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                log = (self.home / "cp-logs" / f"{name}.log").read_text(errors="replace")  # type: ignore[operator]
                raise ControlPlaneError(f"airflow {name} exited with {proc.returncode}:\n{log[-3000:]}")

    def restart_api_server(self, down_s: float = 0.0) -> None:
        """Kill the API server, stay down ``down_s`` seconds, start it again (fault tests)."""
        self.kill_api_server()
        time.sleep(down_s)
        self.start_api_server()

    def kill_api_server(self) -> None:
        proc = self._procs.pop("api-server")
        self._terminate(proc)

    def start_api_server(self, timeout_s: float = 120.0) -> None:
        assert self.home is not None
        argv = [airflow_bin(self.python), "api-server", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn("api-server", argv, self.home / "cp-logs")
        self._wait_ready(timeout_s)

    def restart_scheduler(self, **env: str) -> None:
        """Restart the scheduler with ``env`` added to the control plane's environment (benchmarks:
        the same control plane under another executor)."""
        assert self.home is not None
        self._terminate(self._procs.pop("scheduler"))
        self.extra_env.update(env)
        self._spawn("scheduler", [airflow_bin(self.python), "scheduler"], self.home / "cp-logs")

    def start_triggerer(self) -> None:
        """Start a central ``airflow triggerer`` (deferrals the stock way); ``stop_triggerer()`` ends
        it. Not started by ``start()``: a test of local triggers shows that none runs centrally.
        Trigger classes of the DAG folder are importable there, as a deployment installs them."""
        assert self.home is not None
        if "triggerer" not in self._procs:
            path = os.pathsep.join(p for p in (str(self.dags_folder), self.env.get("PYTHONPATH")) if p)
            self._spawn("triggerer", [airflow_bin(self.python), "triggerer"], self.home / "cp-logs",
                        env={"PYTHONPATH": path})

    def stop_triggerer(self) -> None:
        """Stop the central triggerer; safe if none runs."""
        proc = self._procs.pop("triggerer", None)
        if proc is not None:
            self._terminate(proc)

    def rotate_jwt_secret(self, secret: str) -> None:
        """Restart, with ``[api_auth] jwt_secret`` set to ``secret``, every component that uses it: the
        API server (validates Edge API and Execution API tokens, signs refreshed task tokens) and the
        scheduler (signs the workload token each queued job carries). The dag-processor signs nothing.
        Tokens signed with the old secret are refused from then on, including those of tasks already
        queued or running: a shared secret has no grace period for its predecessor."""
        self.kill_api_server()
        self.jwt_secret = secret
        self.restart_scheduler()
        if self._client is not None:  # its API token was signed with the old secret
            self._client.close()
            self._client = None
        self.start_api_server()

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        """Stop every component; safe before ``start()`` and safe twice."""
        procs, self._procs = self._procs, {}
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            self._terminate(proc)
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._postgres is not None:  # after every component that connects to it
            self._postgres.stop()
            self._postgres = None
        if self._own_home and self.home is not None and not os.environ.get("OUTPOST_KEEP_CONTROLPLANE"):
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST helpers -----------------------------------------------------------------------
    @property
    def api(self) -> httpx.Client:
        if self._client is None:
            headers = {}
            # Airflow 3.1 wants a token even with simple_auth_manager_all_admins (3.2 and later let
            # every request in); its simple auth manager hands one out without credentials.
            with contextlib.suppress(httpx.HTTPError, ValueError):
                token = httpx.get(f"{self.base_url}/auth/token", timeout=30)
                if token.is_success:
                    headers["Authorization"] = f"Bearer {token.json()['access_token']}"
            self._client = httpx.Client(base_url=f"{self.base_url}/api/v2", timeout=30, headers=headers)
        return self._client

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.api.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise ControlPlaneError(f"{method} {path} -> {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    def version(self) -> str:
        """The Airflow version the API server reports."""
        return str(self._json("GET", "/version")["version"])

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120.0) -> None:
        """Wait until the dag-processor has serialized ``dag_id`` and it can be triggered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            resp = self.api.get(f"/dags/{dag_id}/details")
            if resp.status_code == 200:
                return
            time.sleep(0.5)
        errors = self._json("GET", "/importErrors").get("import_errors", [])
        raise ControlPlaneError(f"DAG {dag_id!r} not parsed within {timeout_s:.0f}s; import errors: {errors}")

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """Trigger ``dag_id`` now and return the run id."""
        self.wait_for_dag(dag_id)
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self._json("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 300.0) -> str:
        """Block until the run is success or failed; return its state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in TERMINAL_RUN_STATES:
                return state
            self._check_alive()
            time.sleep(0.3)
        raise ControlPlaneError(f"run {dag_id}/{run_id} did not finish within {timeout_s:.0f}s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self._json(
                "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100, "offset": offset}
            )
            out.extend(page["task_instances"])
            offset += len(page["task_instances"])
            if not page["task_instances"] or offset >= page["total_entries"]:
                return out

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``{task_id or task_id[map_index]: state}`` for a run."""
        return {
            (ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"): ti["state"]
            for ti in self.task_instances(dag_id, run_id)
        }

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """The XCom value as the control plane stores it (deserialized)."""
        resp = self._json(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": True, "stringify": False},
        )
        return resp["value"]

    def set_worker_maintenance(self, worker_name: str, on: bool, comment: str = "requested by test") -> None:
        """Ask a worker to enter/leave maintenance through the Edge UI API, as an operator would."""
        path = f"{self.base_url}/edge_worker/ui/worker/{worker_name}/maintenance"
        if on:
            resp = self.api.post(path, json={"maintenance_comment": comment})
        else:
            resp = self.api.delete(path)
        if resp.status_code >= 400:
            raise ControlPlaneError(f"maintenance {on} for {worker_name} -> {resp.status_code}: {resp.text}")

    def _ui(self, method: str, path: str, **kwargs: Any) -> None:
        resp = self.api.request(method, f"{self.base_url}/edge_worker/ui{path}", **kwargs)
        if resp.status_code >= 400:
            raise ControlPlaneError(f"{method} {path} -> {resp.status_code}: {resp.text}")

    def request_worker_shutdown(self, worker_name: str) -> None:
        self._ui("POST", f"/worker/{worker_name}/shutdown")

    def set_worker_concurrency(self, worker_name: str, concurrency: int) -> None:
        self._ui("PATCH", f"/worker/{worker_name}/concurrency", json={"concurrency": concurrency})

    def add_worker_queue(self, worker_name: str, queue: str) -> None:
        self._ui("PUT", f"/worker/{worker_name}/queues/{queue}")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        """The task log as the control plane serves it (empty if it has none)."""
        resp = self.api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                            params={"full_content": True, "map_index": map_index}, headers={"Accept": "application/json"})
        if resp.status_code == 404:
            return ""
        resp.raise_for_status()
        return resp.text

    def edge_jobs(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The Edge executor's jobs of a run (one per try), with the state the worker last reported."""
        resp = self.api.get(f"{self.base_url}/edge_worker/ui/jobs",
                            params={"dag_id_pattern": dag_id, "run_id_pattern": run_id})
        resp.raise_for_status()
        return [j for j in resp.json()["jobs"] if j["dag_id"] == dag_id and j["run_id"] == run_id]

    def workers(self) -> dict[str, dict[str, Any]]:
        resp = self.api.get(f"{self.base_url}/edge_worker/ui/worker")
        resp.raise_for_status()
        return {w["worker_name"]: w for w in resp.json()["workers"]}
