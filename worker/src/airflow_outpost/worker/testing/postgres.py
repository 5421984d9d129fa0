"""A throw-away PostgreSQL server for the test control plane (``OUTPOST_TEST_DB=postgres``).

Production control planes run Airflow on PostgreSQL, where the Edge API's job claim
(``SELECT ... FOR UPDATE SKIP LOCKED``) really locks; on SQLite it is a no-op. This runs Debian's
``postgresql`` server binaries directly (``apt-get install -y postgresql``): ``initdb`` into a
temporary folder (trust authentication, loopback only), ``postgres`` as a child process on a free
loopback port, one database; :meth:`PostgresServer.stop` stops it and removes the folder. As root
(PostgreSQL refuses to run as root) both run as the ``postgres`` OS user. Airflow reaches it
through ``psycopg2`` and, for its async engine, ``asyncpg`` (both in the ``dev`` extra).

Nothing here is used by a production worker.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_outpost.worker.errors import OutpostError
from airflow_outpost.worker.procutil import die_with_parent

DATABASE = "airflow"
TEST_DB_ENV = "OUTPOST_TEST_DB"  # "sqlite" (default) or "postgres"


class PostgresError(OutpostError):
    """The throw-away PostgreSQL server could not be started."""


def metadata_db(env: dict[str, str] | None = None) -> str:
    """The metadata database the test control plane uses: ``OUTPOST_TEST_DB`` (sqlite or postgres)."""
    value = (env if env is not None else os.environ).get(TEST_DB_ENV, "sqlite").strip().lower() or "sqlite"
    if value not in ("sqlite", "postgres"):
        raise PostgresError(f"{TEST_DB_ENV}={value!r}: expected 'sqlite' or 'postgres'")
    return value


def server_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (Debian keeps them out of ``PATH``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    if (initdb := shutil.which("initdb")) and Path(initdb).resolve().with_name("postgres").exists():
        return Path(initdb).resolve().parent
    raise PostgresError("PostgreSQL server binaries not found: apt-get install -y postgresql")


@dataclass
class PostgresServer:
    """``start()`` runs a fresh server and returns its SQLAlchemy URL; ``stop()`` is safe twice and
    before ``start()``."""

    port: int = 0
    max_connections: int = 300  # several workers' task processes reach the DB through the api-server's pool
    _root: Path | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def folder(self) -> Path | None:
        """The temporary folder holding the data, the socket and ``postgres.log`` (None when stopped)."""
        return self._root

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _as_postgres(self) -> dict[str, Any]:
        """Popen arguments that run a command as the ``postgres`` OS user when we are root."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PostgresError("running as root needs the 'postgres' OS user (apt-get install -y postgresql)") from exc
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self, timeout_s: float = 60.0) -> str:
        from airflow_outpost.worker.testing.controlplane import free_port

        if self._proc is not None:
            return self.url
        bindir = server_bindir()
        self._root = Path(tempfile.mkdtemp(prefix="outpost-postgres-"))
        data, sockets = self._root / "data", self._root / "sockets"
        sockets.mkdir()
        as_pg = self._as_postgres()
        if as_pg:
            for path in (self._root, sockets):
                os.chown(path, as_pg["user"], as_pg["group"])
        self.port = self.port or free_port()
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                               "--no-sync"], capture_output=True, text=True, timeout=timeout_s, cwd=self._root, **as_pg)
        if init.returncode != 0:
            self.stop()
            raise PostgresError(f"initdb failed:\n{init.stderr[-3000:]}")
        log = open(self._root / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        # A throw-away test database: durability off, so it costs no more than SQLite.
        self._proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sockets),
             "-c", "listen_addresses=127.0.0.1", "-c", f"max_connections={self.max_connections}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self._root,
            preexec_fn=die_with_parent, **as_pg)  # a killed test run leaves no server behind
        log.close()
        try:
            self._create_database(bindir, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _create_database(self, bindir: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        argv = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {DATABASE}"]
        while True:
            assert self._proc is not None and self._root is not None
            if self._proc.poll() is not None:
                raise PostgresError(f"postgres exited with {self._proc.returncode}:\n"
                                    f"{(self._root / 'postgres.log').read_text(errors='replace')[-3000:]}")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres did not accept connections within {timeout_s:.0f}s: {done.stderr[-1000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        root, self._root = self._root, None
        if root is not None and not os.environ.get("OUTPOST_KEEP_CONTROLPLANE"):
            shutil.rmtree(root, ignore_errors=True)
