"""The deployment recipes as written: the images' entrypoint, the env example and unit paths, the
README's docker commands, the preemption watcher, the CLI's options, and first errors."""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.cli.main import build_parser
from airflow_outpost.worker.config import _FIELDS, load_settings
from airflow_outpost.worker.preflight import airflow_jwt_secret
from airflow_outpost.worker.runtime.state import StateFolder
from airflow_outpost.worker.testing.worker_process import run_outpost
from tests.helpers import DAGS, DOCS, REPO, build_wheels, doc_files, fresh_venv

IMAGES = REPO / "images"
ENTRYPOINT = IMAGES / "entrypoint.sh"


def _bin_path() -> str:
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


# -- the images' entrypoint --------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "shows"), [
    ([], "usage: outpost worker"),  # no arguments: the worker (its --help, to stop there)
    (["--exit-when-idle", "15m", "--help"], "usage: outpost worker"),  # options only: still the worker
    (["status", "--help"], "usage: outpost status"),  # a subcommand runs as given
])
def test_entrypoint_runs_the_worker_unless_given_a_subcommand(argv: list[str], shows: str) -> None:
    args = argv or ["--help"]
    out = subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": _bin_path()})
    assert out.returncode == 0 and out.stdout.startswith(shows), out.stdout + out.stderr


# -- the docs' docker commands agree with the images and the settings ----------------------------
def _readme_shell_blocks() -> list[str]:
    """The fenced blocks of README and the docs pages that are shell (```bash, ```sh or a bare ```)."""
    blocks: list[str] = []
    lang: str | None = None
    lines: list[str] = []
    for line in "\n".join(p.read_text() for p in doc_files()).splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in ("", "bash", "sh"):
                    blocks.append("\n".join(lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _readme_docker_runs() -> list[list[str]]:
    runs = []
    for block in _readme_shell_blocks():
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("docker run"):
                runs.append(shlex.split(command, comments=True))
    return runs


def test_readme_docker_runs_mount_state_and_secret_and_outlast_the_drain() -> None:
    runs = _readme_docker_runs()
    assert len(runs) >= 2
    env_example = {k: v for k, _, v in (line.partition("=") for line in (IMAGES / "outpost.env.example").read_text()
                                          .splitlines() if line.startswith("OUTPOST_"))}
    budget = load_settings({"api_url": "http://h:1"}, env={}).stop_budget_s()
    for argv in runs:
        volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
        assert any(v.split(":")[1] == "/var/lib/outpost" and not v.startswith("/") for v in volumes), argv  # named
        assert any(v.split(":")[1] == env_example["OUTPOST_JWT_SECRET_FILE"] and v.endswith(":ro") for v in volumes)
        assert int(argv[argv.index("--stop-timeout") + 1]) >= budget, argv
        assert "--env-file" in argv
        image = next(a for a in argv if a.startswith("airflow-outpost:"))
        after = argv[argv.index(image) + 1:]
        # Whatever follows the image reaches the worker (entrypoint): options only, no subcommand.
        assert all(a.startswith("-") or after[i - 1].startswith("-") for i, a in enumerate(after)), after
        if after:
            build_parser().parse_args(["worker", *after])


# -- preemption notices ------------------------------------------------------------------------
class _Metadata(http.server.BaseHTTPRequestHandler):
    replies: dict[str, tuple[int, str]] = {}
    seen: list[tuple[str, str, dict[str, str]]] = []

    def _answer(self) -> None:
        self.seen.append((self.command, self.path, dict(self.headers)))
        status, body = self.replies.get(f"{self.command} {self.path}", (404, ""))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metadata() -> Iterator[tuple[str, type[_Metadata]]]:
    handler = type("Handler", (_Metadata,), {"replies": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("provider", "quiet", "reclaim", "header"), [
    ("aws", {"PUT /latest/api/token": (200, "tok")},
     {"GET /latest/meta-data/spot/instance-action": (200, '{"action": "terminate", "time": "2026-12-01T12:00:00Z"}')},
     ("X-aws-ec2-metadata-token", "tok")),
    ("gcp", {"GET /computeMetadata/v1/instance/preempted": (200, "FALSE")},
     {"GET /computeMetadata/v1/instance/preempted": (200, "TRUE")}, ("Metadata-Flavor", "Google")),
    ("azure", {"GET /metadata/scheduledevents?api-version=2020-07-01": (200, '{"Events": [{"EventType": "Reboot"}]}')},
     {"GET /metadata/scheduledevents?api-version=2020-07-01": (200, '{"Events": [{"EventType": "Preempt"}]}')},
     ("Metadata", "true")),
])
def test_preemption_watcher_writes_the_notice_when_the_cloud_reclaims(tmp_path: Path, metadata, provider: str,
                                                                      quiet: dict, reclaim: dict,
                                                                      header: tuple[str, str]) -> None:
    url, handler = metadata
    handler.replies.update(quiet)
    notice = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, str(IMAGES / "preemption-watcher.py"), "--provider", provider,
                             "--notice-file", str(notice), "--interval", "0.1", "--url", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None and not notice.exists()  # nothing announced: keeps watching
        handler.replies.update(reclaim)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert notice.read_text().startswith(f"{provider}: ") and "wrote" in out
    assert list(tmp_path.iterdir()) == [notice]  # written atomically: no temp file left
    # Header names are case-insensitive (urllib sends them title-cased).
    assert any({k.lower(): v for k, v in h.items()}.get(header[0].lower()) == header[1] for _, _, h in handler.seen)


# -- options -----------------------------------------------------------------------------------
def test_every_worker_flag_has_help_and_a_reference_row() -> None:
    readme = (DOCS / "reference" / "configuration.md").read_text()
    worker = build_parser()._subparsers._group_actions[0].choices["worker"]  # type: ignore[union-attr]
    for action in worker._actions:
        if action.dest in _FIELDS:
            assert action.help and "see README" not in action.help, action.dest
            assert f"`{action.option_strings[0]}`" in readme, action.option_strings[0]


def test_boolean_flags_alone_mean_true_and_take_a_value_too() -> None:
    parser = build_parser()
    assert parser.parse_args(["worker", "--push-logs"]).push_logs == "true"
    assert parser.parse_args(["worker", "--push-logs", "false", "--api-url", "x"]).push_logs == "false"
    s = load_settings({"api_url": "http://h:1", "push_logs": "true", "model_service": "false"}, env={})
    assert s.push_logs is True and s.model_service is False


def test_log_level_works_before_and_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["--log-level", "DEBUG", "status"]).log_level == "DEBUG"
    assert parser.parse_args(["status", "--log-level", "WARNING"]).log_level == "WARNING"
    assert parser.parse_args(["worker", "--log-level", "ERROR"]).log_level == "ERROR"


def test_budgets_table_next_to_a_worker_table_is_kept(tmp_path: Path) -> None:
    cfg = tmp_path / "outpost.toml"
    cfg.write_text('[worker]\napi_url = "http://h:1"\nqueues = ["gpu"]\n\n[budgets]\n"queue:gpu" = "2h"\n')
    s = load_settings(env={}, config_file=cfg)
    assert s.queues == ("gpu",) and s.budgets == (("queue:gpu", 7200.0),)


def test_status_and_egress_find_the_state_folder_through_config(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    state = StateFolder(folder)
    state.acquire()  # as the worker that wrote status.json does: `outpost status` asks who holds the lock
    (folder / "status.json").write_text(json.dumps({"pid": os.getpid(), "name": "w", "api_url": "http://h:1",
                                                    "state": "idle", "updated": time.time(), "concurrency": 1,
                                                    "free_slots": 1, "queues": None}))
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(f'api_url = "http://h:1"\nstate_folder = "{folder}"\n')
    try:
        out = run_outpost("status", "--config", str(cfg), "--json")
    finally:
        state.release()
    assert out.returncode == 0 and json.loads(out.stdout)["name"] == "w", out.stderr
    ledger = run_outpost("egress", "verify", "--config", str(cfg))
    assert f"no egress ledger at {folder / 'egress.sqlite'}" in ledger.stderr


# -- first errors ------------------------------------------------------------------------------
def test_missing_credentials_stop_at_config_time_with_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started = time.monotonic()
    out = run_outpost("worker", "--api-url", "http://127.0.0.1:9", "--state-folder", str(state),
                      "--metrics-port", "0", env={"HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("outpost: invalid setting jwt_secret=None: required: set OUTPOST_JWT_SECRET")
    assert time.monotonic() - started < 30 and not (state / "status.json").exists()  # nothing was started
    missing = run_outpost("worker", "--api-url", "http://127.0.0.1:9", "--jwt-secret-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "jwt_secret_file" in missing.stderr


def test_the_stock_workers_airflow_secret_is_used_when_no_outpost_credential_is_set(tmp_path: Path) -> None:
    assert load_settings({"api_url": "http://h:1"}, env={"AIRFLOW__API_AUTH__JWT_SECRET": "from-env"}).secret() == \
        "from-env"
    home = tmp_path / "airflow"
    home.mkdir()
    (home / "airflow.cfg").write_text("[api_auth]\njwt_secret = from-cfg\n")
    assert airflow_jwt_secret({"AIRFLOW_HOME": str(home)}) == "from-cfg"
    assert airflow_jwt_secret({"HOME": str(tmp_path)}) == "from-cfg"  # ~/airflow/airflow.cfg, as Airflow
    s = load_settings({"api_url": "http://h:1"}, env={"AIRFLOW_HOME": str(home)})
    assert s.secret() == "from-cfg"
    ours = load_settings({"api_url": "http://h:1"}, env={"AIRFLOW_HOME": str(home), "OUTPOST_JWT_SECRET": "ours"})
    assert ours.secret() == "ours"  # an outpost setting wins
    assert airflow_jwt_secret({}) is None


# -- the env example, run as the image runs it --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _as_image_user() -> Callable[[], None] | None:
    if os.getuid() != 0:
        return None

    def switch() -> None:
        os.setgroups([])
        os.setgid(10001)
        os.setuid(10001)

    return switch


@pytest.mark.controlplane
@pytest.mark.timeout(600)
def test_env_example_starts_a_worker_with_the_images_user_and_paths(control_plane) -> None:
    """images/outpost.env.example + the image's ENV and entrypoint, in a fresh venv, as uid 10001
    (when the tests run as root), every absolute path moved under a temporary root."""
    root = Path(tempfile.mkdtemp(prefix="outpost-root-"))
    try:
        root.chmod(0o755)
        venv, site = fresh_venv(root, *build_wheels(root).values())
        # uid 10001 must be able to reach the interpreter and the borrowed dependencies; where the
        # interpreter lives in root's home (pyenv) the worker runs as this user instead.
        reachable = all(_traversable_by_others(p) for p in (Path(sys.base_prefix), Path(sysconfig_purelib()), root))
        switch = _as_image_user() if reachable else None
        home = root / "var/lib/outpost"
        dags = root / "opt/dags"
        secret = root / "etc/outpost/jwt_secret"
        for folder in (home, dags, secret.parent):
            folder.mkdir(parents=True)
        shutil.copy(DAGS / "outpost_recipe.py", dags / "outpost_recipe.py")
        secret.write_text(control_plane.jwt_secret)
        if switch is not None:  # as the image and the unit lay them out: the user owns its home only
            os.chown(home, 10001, 10001)
            os.chown(secret, 0, 10001)
            secret.chmod(0o640)
            for p in root.rglob("*"):
                if p.is_dir():
                    p.chmod(p.stat().st_mode | 0o055)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "AIRFLOW_"))}
        for line in (IMAGES / "outpost.env.example").read_text().splitlines():
            if line.startswith("OUTPOST_"):
                key, _, value = line.partition("=")
                env[key] = str(root / value.lstrip("/")) if value.startswith("/") else value
        port = _free_port()
        env.update({
            # The image's ENV (Dockerfile), under the temporary root.
            "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "HOME": str(home), "OUTPOST_HOME": str(home),
            "PYTHONUNBUFFERED": "1", "OUTPOST_METRICS_PORT": str(port),
            # What a user sets for their control plane; loopback only in tests.
            "OUTPOST_API_URL": control_plane.base_url, "OUTPOST_METRICS_HOST": "127.0.0.1",
            "HF_HUB_OFFLINE": "1", "OUTPOST_NAME": f"recipe-{os.getpid()}",
        })
        entry = shutil.copy(ENTRYPOINT, root / "outpost-entrypoint")
        log = (root / "outpost.log").open("wb")
        proc = subprocess.Popen(["sh", entry], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=switch)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (root / "outpost.log").read_text()[-4000:]
                assert time.monotonic() < deadline, (root / "outpost.log").read_text()[-4000:]
                time.sleep(0.5)
            run_id = control_plane.trigger("outpost_recipe")
            state = control_plane.wait_for_run("outpost_recipe", run_id, timeout_s=180)
            assert state == "success", (root / "outpost.log").read_text()[-4000:]
            said = control_plane.xcom("outpost_recipe", run_id, "hello")
            assert said == f"hello from {env['OUTPOST_NAME']} uid {10001 if switch else os.getuid()}"
            # Everything the worker wrote is under the image's OUTPOST_HOME.
            assert (home / "state" / "status.json").is_file()
            assert list((home / "logs").rglob("attempt=1.log"))
        finally:
            proc.terminate()
            code = proc.wait(120)
            log.close()
        assert code == 0, (root / "outpost.log").read_text()[-4000:]
        # A log folder the worker cannot create (as uid 10001: root's /var/log/outpost; as root: a
        # path through a file): one line, exit 2, before anything starts.
        locked = root / "var/log/outpost"
        if switch is not None:
            locked.mkdir(parents=True)
            locked.chmod(0o755)
        else:
            locked.parent.mkdir(parents=True)
            locked.write_text("a file, not a folder")
        bad = subprocess.run(["sh", entry, "--log-folder", str(locked / "tasks")], env=env, cwd=home,
                             preexec_fn=switch, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.strip().startswith(f"outpost: invalid setting log_folder={str(locked / 'tasks')!r}: must be a folder")
        assert f"uid {10001 if switch else os.getuid()}" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sysconfig_purelib() -> str:
    import sysconfig

    return sysconfig.get_path("purelib")
