"""``outpost egress report`` and ``outpost egress verify``: read the egress ledger of a state folder."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from airflow_outpost.worker.cli.local import add_state_args, state_folder_for
from airflow_outpost.worker.egress import ledger

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(text: str) -> float:
    m = _DURATION.match(text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 24h, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _ledger_path(args: argparse.Namespace) -> Path:
    return state_folder_for(args) / "egress.sqlite"


def add_egress_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``egress report`` and ``egress verify`` on the ``outpost`` sub-parsers."""
    eg = sub.add_parser("egress", help="what left the region: report and verify the egress ledger")
    eg_sub = eg.add_subparsers(dest="egress_command", required=True)
    rep = eg_sub.add_parser("report", parents=[common], help="totals by kind and the largest items")
    rep.add_argument("--since", type=_duration_s, default=None, help="only the last 90s / 15m / 24h / 7d")
    rep.add_argument("--task", default=None, help="only tasks whose label contains this (dag.task, run id, ...)")
    rep.add_argument("--top", type=int, default=10, help="how many of the largest items (default 10)")
    add_state_args(rep)
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_report)
    ver = eg_sub.add_parser("verify", parents=[common], help="check the hash chain; exit 1 at the first tampered row")
    add_state_args(ver)
    ver.set_defaults(func=cmd_verify)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_report(args: argparse.Namespace) -> int:
    path = _ledger_path(args)
    if not path.exists():
        print(f"no egress ledger at {path}", file=sys.stderr)
        return 1
    data = ledger.report(path, since_s=args.since, task=args.task, top=args.top)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"egress ledger {path}: {data['requests']} request(s), {_size(data['bytes_sent'])} sent")
    for name, rows in (("kind", data["kinds"]), ("workload", data["workloads"])):
        print(f"  {name:<14}{'requests':>10}{'sent':>12}{'received':>12}{'refused':>9}")
        for r in rows:
            print(f"  {r[name]:<14}{r['requests']:>10}{_size(r['bytes_sent']):>12}{_size(r['bytes_received']):>12}"
                  f"{r['refused']:>9}")
    if data["largest"]:
        print("largest items:")
        for r in data["largest"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
            print(f"  {when} {_size(r['bytes']):>10} {r['kind']:<11} {r['outcome']:<8} {r['method']} {r['endpoint']}"
                  f"  task={r['task'] or '-'}")
    if data["refused"]:
        print("refused:")
        for r in data["refused"]:
            print(f"  {r['kind']:<11} {r['rule'] or '-'}: {r['method']} {r['endpoint']} task={r['task'] or '-'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path = _ledger_path(args)
    if not path.exists():
        print(f"no egress ledger at {path}", file=sys.stderr)
        return 1
    try:
        result = ledger.verify(path)
    except ledger.LedgerKeyError as exc:
        print(f"cannot verify: {exc}", file=sys.stderr)
        return 1
    if result.ok:
        if not result.keyed:
            legacy = (f" ({result.legacy_rows} legacy row(s): no key at {ledger.key_path(path)}, so the plain "
                      "SHA-256 chain is checked, which anyone who can write the file can recompute)")
        elif result.legacy_rows:
            legacy = (f" ({result.legacy_rows} legacy row(s) from before the key, plain SHA-256, covered by the "
                      "keyed rows after them)")
        else:
            legacy = ""
        print(f"ok: {result.rows} row(s), chain intact{legacy}; head {result.head}")
        return 0
    row = result.bad_row or {}
    print(f"TAMPERED: row {row.get('id')} ({result.reason}); {result.rows} row(s) before it verify; "
          f"row: {json.dumps({k: row.get(k) for k in ('id', *ledger.FIELDS)}, default=str)}", file=sys.stderr)
    return 1
