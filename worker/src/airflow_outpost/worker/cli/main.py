"""``outpost`` command line: ``worker``, ``status``, ``stop``, ``maintenance``, ``demo``, ``egress``, ``bench``,
``scaler``.

Signals are installed here and nowhere else: the first SIGTERM/SIGINT drains, the second skips
the drain wait. Known failures print one line to stderr and exit non-zero, never a traceback:
exit 2 for a bad setting (a missing credential, an unwritable folder: found before anything
starts), 1 for anything that stops the worker from joining or running. A clean stop exits 0, or
3 after ``exit_when_idle_s`` and 4 after a preemption notice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from airflow_outpost.worker.cli.local import add_local_parsers, add_state_args, is_worker_of, state_folder_for
from airflow_outpost.worker.config import _FIELDS, load_settings
from airflow_outpost.worker.errors import ConfigError, OutpostError
from airflow_outpost.worker.preflight import check_memory_merge, require_credentials, require_writable, warn_plain_http
from airflow_outpost.worker.procutil import mark_undumpable
from airflow_outpost.worker.runtime.file_modes import WORKER_UMASK, secure_folders

EXIT_CONFIG = 2
EXIT_FAILED = 1


class _RefuseSecretFlag(argparse.Action):
    """``--jwt-secret VALUE``: refused without echoing VALUE (argparse would print it as unrecognized)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error("--jwt-secret is not a flag (a flag shows in `ps`): set OUTPOST_JWT_SECRET or use --jwt-secret-file")


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (env OUTPOST_CONFIG)")
    p.add_argument("--jwt-secret", dest="refused_jwt_secret", action=_RefuseSecretFlag, help=argparse.SUPPRESS)
    helps = {
        "api_url": "Airflow API server root, e.g. http://airflow:8080 (env OUTPOST_API_URL)",
        "name": "worker name, unique per control plane (default: hostname)",
        "queues": "comma-separated queues to serve (default: all)",
        "concurrency": "task slots (default 4)",
        "poll_interval_s": "longest wait between job polls when idle (default 2.0)",
        "poll_min_interval_s": "first wait after a poll found nothing (default 0.1); 0.4 x this (not below 0.02) for 0.5 s "
                               "after one of this worker's tasks reports success, failed or skipped",
        "heartbeat_interval_s": "seconds between heartbeats (default 10)",
        "execution_api_url": "Task Execution API URL (default: <api-url>/execution/)",
        "log_folder": "where task logs are written (default ~/.outpost/logs)",
        "log_group": "group that may read task logs, e.g. a log shipper's: the log folder is given to it (setgid); "
                     "logs are 0640, folders 0750 (default: the worker's own group)",
        "state_folder": "job journal, lock and status (default ~/.outpost/state)",
        "dags_folder": "DAG files on this host (sets [core] dags_folder for tasks)",
        "push_logs": "also ship task logs to the control plane (true/false)",
        "drain_timeout_s": "on shutdown, how long running tasks may finish (default 300)",
        "kill_grace_s": "after the drain timeout, SIGTERM->SIGKILL grace (default 10)",
        "jwt_secret_file": "file holding the control plane's [api_auth] jwt_secret",
        "crash_policy": "after a worker crash: stop (tasks die with it, reported failed) or adopt (tasks run on; "
                        "a restart with the same state folder takes them over) (default stop)",
        "triggers": "where deferred tasks wait: central (the control plane's triggerer) or local (on this worker; "
                    "trigger kwargs stay in the region) (default central)",
        "max_local_triggers": "with --triggers local, how many tasks may wait on this worker at once (default 1000)",
        "prewarm": "1: fork tasks from a pre-imported zygote (fast start); 0: fresh interpreter per task",
        "preload": "modules the zygote imports before forking tasks, comma-separated (what your DAGs import: "
                   "every task then shares one copy)",
        "memory_merge": "let the kernel merge identical pages of task processes (KSM; Linux 6.4+, KSM running on "
                        "the host) (true/false; default false)",
        "metrics_host": "address of the /healthz, /readyz, /metrics server (default 127.0.0.1)",
        "metrics_port": "port of the health/metrics server; 0 = off (default 9464)",
        "gpu_queues": "queue names/globs whose tasks take GPUs, one per pool slot (default gpu*)",
        "gpus": "GPU devices to hand out, e.g. 0,1,2,3 or none (default: detect)",
        "exit_when_idle_s": "drain, sign off and exit 3 after this long without work, e.g. 15m (default: never)",
        "idle_exit_code": "exit code after --exit-when-idle (default 3; 0 for Kubernetes Jobs, which count only 0 as success)",
        "preemption_notice_file": "when this file appears (spot preemption notice), drain with the short timeout",
        "preemption_drain_timeout_s": "drain timeout after a preemption notice (default 30)",
        "warm_models": "comma-separated embedding models to load once at start",
        "ray": "Ray for tasks: local (a persistent Ray head owned by the worker), or an existing cluster: auto, "
               "host:port, ray://host:port (default: each task starts its own)",
        "ray_num_cpus": "CPUs of the local Ray head (default: all cores)",
        "ray_num_gpus": "GPUs of the local Ray head (default 0)",
        "ray_node_ip_address": "IPv4 address of this host that the local Ray head gives nodes and tasks as its "
                               "own, so other hosts can join it with ray start (default 127.0.0.1: this host only)",
        "ray_auth_token_file": "file holding an existing Ray cluster's auth token (tasks get RAY_AUTH_TOKEN_PATH)",
        "ray_keep_warm_s": "how long tasks' Ray model actors stay warm when idle (default: model_idle_s)",
        "budgets": "daily budgets, e.g. queue:gpu=2h,dag:train=30m (also --budget, repeatable)",
        "push_log_chunk_size": "characters per pushed log chunk (default 512000)",
        "startup_timeout_s": "how long to retry reaching the control plane at start (default 15)",
        "request_timeout_s": "per-request HTTP timeout (default 30)",
        "outage_hold_s": "while the control plane is unreachable, how long a task's request is held before it fails "
                         "(0 = fail at once; default 900)",
        "confirm_start_s": "SQLite control planes: confirm a task start after this long before running it "
                           "(~0.3; default 0 = off)",
        "jwt_issuer": "iss claim, if the server sets [api_auth] jwt_issuer",
        "team_name": "team for Airflow's multi-team mode",
        "edge_provider_version": "edge3 version reported to the server's version check (default: installed edge3)",
        "model_service": "start the runners' model service so models stay loaded across tasks (true/false; default true)",
        "model_idle_s": "release a model the service has not used for this long (default 600)",
        "region": "region name carried by region-local XCom references and policy messages (default 'default')",
        "region_local_xcom": "keep large or data-typed XCom values in the region, send a reference (true/false; default true)",
        "xcom_threshold_bytes": "serialized size above which an XCom value stays in the region (default 65536)",
        "max_xcom_bytes": "largest XCom body sent to the control plane; bigger ones fail the task (0 = no limit)",
        "task_user": "run task processes as this OS user through sudo, so DAG code cannot read the worker's "
                     "secret, config or process (needs --log-group, a group both users are in; README \"Trust boundary\")",
        "max_variable_bytes": "largest Variable.set body sent to the control plane (0 = no limit; default 1048576)",
        "max_asset_event_bytes": "largest task state update, with its asset events and their extras (0 = no limit; "
                                 "default 1048576)",
        "max_dagrun_conf_bytes": "largest DAG run trigger, with its conf (0 = no limit; default 1048576)",
        "max_hitl_bytes": "largest human-in-the-loop response (0 = no limit; default 1048576)",
        "logs": "what leaves with task logs: none, redacted or full (default none; full with --push-logs)",
        "redacted_log_max_bytes": "cap of the redacted log copy per task try (default 262144)",
        "redact_patterns": "extra regexes masked in redacted logs, one per line",
        "secrets": "local-only, local-first or central: where tasks' Variables/Connections may come from "
                   "(default local-first)",
        "rendered_fields": "local (keep rendered template fields in the region) or full (default local)",
        "store_root": "region-local store root (default <state-folder>/store)",
        "token_file": "OIDC mode: present the token in this file (re-read when it changes)",
        "oidc_token_url": "OIDC mode: OAuth2 token endpoint for the client-credentials grant",
        "oidc_client_id": "OIDC mode: client id",
        "oidc_client_secret_file": "OIDC mode: file holding the client secret (re-read at each refresh)",
        "oidc_audience": "OIDC mode: audience asked for (must match [edge] jwt_audience)",
        "oidc_scope": "OIDC mode: scope asked for",
        "ca_bundle": "CA bundle for the control plane's TLS certificate (default: system CAs)",
        "client_cert": "client certificate (PEM) for mTLS",
        "client_key": "client key, if not in the client certificate's PEM",
    }
    aliases = {"exit_when_idle_s": ["--exit-when-idle"]}
    for name in _FIELDS:
        if name == "jwt_secret":
            continue  # secrets on the command line end up in `ps`; use env or a file
        flag = "--" + name.replace("_", "-")
        env = f" [env OUTPOST_{name.upper()}]"
        if _FIELDS[name].annotation is bool:
            # `--push-logs` alone means true; `--push-logs false` still turns it off.
            p.add_argument(flag, *aliases.get(name, []), dest=name, default=None, nargs="?", const="true",
                           metavar="BOOL", help=helps[name] + env)
        else:
            p.add_argument(flag, *aliases.get(name, []), dest=name, default=None, help=helps[name] + env)
    p.add_argument("--budget", dest="budget_items", action="append", default=None, metavar="KEY=DURATION",
                   help="one daily budget, e.g. --budget queue:gpu=2h (repeatable; joins --budgets)")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_worker(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    flags["config"] = args.config
    if getattr(args, "budget_items", None):
        flags["budgets"] = ",".join([*([flags["budgets"]] if flags.get("budgets") else []), *args.budget_items])
    settings = load_settings(flags)
    # Before anything starts (health server, zygote, model service, Ray): a bad setting is exit 2,
    # which a supervisor does not restart.
    # Everything the worker creates is its own (state 0700, SQLite files 0600); task processes
    # set their own umask (0027) so their logs are readable by the log folder's group only.
    os.umask(WORKER_UMASK)
    # Task processes (and anything else of this user) cannot read the worker's environment or
    # memory through /proc: its credentials live there.
    mark_undumpable()
    require_credentials(settings)
    require_writable(settings)
    secure_folders(settings)
    check_memory_merge(settings)
    warn_plain_http(settings)
    from airflow_outpost.worker.runtime.worker import Worker

    async def main() -> int:
        worker = Worker(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.shutdown)
        return await worker.run()

    return asyncio.run(main())


def _cmd_status(args: argparse.Namespace) -> int:
    folder = state_folder_for(args)
    from airflow_outpost.worker.runtime.state import StateFolder

    status = StateFolder(folder).read_status()
    if status is None:
        print(f"no worker status in {folder} (status.json is missing or unreadable)", file=sys.stderr)
        return EXIT_FAILED
    alive = is_worker_of(folder, status.get("pid"))  # not any process that now has a stale status.json's pid
    from airflow_outpost.worker.runtime.outbox import read_outbox

    # Counted from the outbox itself: right whether the worker runs or not.
    if (box := read_outbox(folder / "outbox.sqlite")) is not None:
        status["outbox"] = {**(status.get("outbox") or {}), **box}
    if args.json:
        print(json.dumps({**status, "alive": alive}, indent=1))
        return 0 if alive else EXIT_FAILED
    age = time.time() - status.get("updated", 0)
    print(f"worker {status['name']} pid {status['pid']} ({'running' if alive else 'NOT running'}), "
          f"state {status['state']}, updated {age:.0f}s ago")
    print(f"  control plane {status['api_url']}: " + (
        f"disconnected since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status['disconnected_since']))}"
        if status.get("disconnected_since") else "connected"))
    if status.get("maintenance"):
        print(f"  maintenance: {status.get('maintenance_comments') or 'on'}")
    queues = ",".join(status["queues"] or ["<all>"])
    print(f"  slots {status['concurrency'] - status['free_slots']}/{status['concurrency']} used, queues {queues}")
    r = status.get("requests_per_s", {})
    print(f"  requests/s: idle {r.get('idle')}, busy {r.get('busy')}, last 60s {r.get('recent')}, total {r.get('total')}")
    if (ray := status.get("ray")):
        kind = "local head owned by the worker" if ray.get("mode") == "local" else "existing cluster"
        up = {True: "up", False: "DOWN (tasks start their own Ray)" if ray.get("mode") == "local" else "DOWN"}.get(
            ray.get("up"), "not checked")
        restarts = f", restarted {ray['restarts']} time(s)" if ray.get("restarts") else ""
        print(f"  ray {ray.get('address') or '-'} ({kind}): {up}{restarts}")
    if (merge := status.get("memory_merge")):
        running = {True: "KSM running on this host", False: "KSM NOT running on this host (nothing is merged)"}.get(
            merge.get("ksm_running"), "KSM state unknown")
        print(f"  memory merge: on, {merge.get('merged_mib')} MiB of running tasks' pages merged ({running})")
    for kind, by_state in sorted((status.get("finished") or {}).items()):
        counts = ", ".join(f"{state} {n}" for state, n in sorted(by_state.items()))
        print(f"  finished {kind}s since start: {counts}")
    if (lt := status.get("local_triggers")):
        ended = ", ".join(f"{kind} {n}" for kind, n in sorted(lt.get("ended", {}).items())) or "none yet"
        print(f"  local triggers: {lt['waiting']}/{lt['max']} waiting (oldest {lt.get('oldest_s', 0)}s); ended: {ended}")
    if (box := status.get("outbox")):
        line = f"  outbox: {box.get('pending', 0)} report(s) pending, {box.get('dead_letters', 0)} dead-lettered"
        if alive and box.get("blocked_by"):
            since = time.strftime("%H:%M:%S", time.localtime(box["blocked_since"])) if box.get("blocked_since") else "?"
            line += f"; delivery waits since {since}: {box['blocked_by']} ({box.get('last_error')})"
        print(line)
        for dead in box.get("dead_letter_recent") or []:
            subject = dead["subject"]
            what = " ".join(f"{subject[k]}" for k in ("dag_id", "task_id", "run_id", "try_number", "map_index")
                            if k in subject) if isinstance(subject, dict) else subject
            print(f"    dead letter: {what} {dead['state']}: {dead['reason']}")
    for job in status.get("jobs", []):
        adopted = " (adopted after a crash)" if job.get("adopted") else ""
        if job.get("waiting"):
            print(f"  job {job['key']} waits on a local trigger (no process, no slot), queue {job['queue']}, "
                  f"{job['running_s']}s since start{adopted}")
            continue
        print(f"  job {job['key']} pid {job['pid']} queue {job['queue']} running {job['running_s']}s{adopted}")
    return 0 if alive else EXIT_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    from airflow_outpost.worker.cli.demo import run_demo

    if args.engine and args.dag != "outpost_rag_pipeline":
        print(f"outpost demo: --engine applies to outpost_rag_pipeline only, not --dag {args.dag}", file=sys.stderr)
        return 2
    return run_demo(keep=args.keep, dag_id=args.dag, engine=args.engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost", description="Airflow 3 remote worker (Edge API + Task SDK)")
    log_help = "DEBUG, INFO, WARNING or ERROR (env OUTPOST_LOG_LEVEL; default INFO)"
    parser.add_argument("--log-level", default=os.environ.get("OUTPOST_LOG_LEVEL", "INFO"), help=log_help)
    # The same option after the subcommand (`outpost worker --log-level DEBUG`); unset there, the
    # top-level value stands.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=log_help)
    sub = parser.add_subparsers(dest="command", required=True)
    # No abbreviations: `--jwt-secret X` would be taken as `--jwt-secret-file X`, and its error would print X.
    w = sub.add_parser("worker", parents=[common], allow_abbrev=False, help="join a control plane and run its tasks")
    add_settings_flags(w)
    w.set_defaults(func=_cmd_worker)
    st = sub.add_parser("status", parents=[common], help="show the running worker's state, jobs and request rate")
    add_state_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    add_local_parsers(sub, common)
    d = sub.add_parser("demo", parents=[common], help="start a local control plane and a worker, run an example DAG")
    d.add_argument("--dag", default="outpost_rag_pipeline",
                   help="example DAG to run (outpost_example: the minimal tour; outpost_search: the README example)")
    d.add_argument("--keep", action="store_true", help="keep the temporary AIRFLOW_HOME")
    d.add_argument("--engine", choices=("local", "ray"), default=None,
                   help="outpost_rag_pipeline only: run embed, build_index and batch_inference on a local Ray "
                        "(ray, the DAG's default) or in the task's process (local)")
    d.set_defaults(func=_cmd_demo)
    from airflow_outpost.worker.cli.egress import add_egress_parser

    add_egress_parser(sub, common)
    from airflow_outpost.worker.cli.bench import add_bench_parser

    add_bench_parser(sub, common)
    from airflow_outpost.worker.cli.scaler import add_scaler_parser

    add_scaler_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would echo them whole; a mistyped secret flag's value must not reach a log.
        flags = " ".join(dict.fromkeys(a.split("=", 1)[0] for a in unknown if a.startswith("-"))) or "(a value)"
        parser.error(f"unrecognized arguments: {flags} (values not shown; see outpost {args.command} --help)")
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"outpost: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OutpostError as exc:
        print(f"outpost: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
