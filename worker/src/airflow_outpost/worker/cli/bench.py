"""``outpost bench``: benchmark the runners on this machine and write a shareable report.

The measuring lives in ``airflow_outpost.runners.bench.run`` and the report in ``airflow_outpost.runners.bench.report`` (both need
the ``runners`` extra, imported only when the command runs). Bad input (unknown ``--only``
section, unusable ``--out``, missing ``--model``, ``--device cuda`` without a GPU) prints one
``outpost: ...`` line and exits 2 before anything is measured; a failure while measuring exits 1.
The report appears under ``--out`` only once everything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2
EXIT_FAILED = 1


def add_bench_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("bench", parents=[common], help="benchmark embeddings, indexes and batch inference on this machine; "
                                     "write a Markdown + JSON report with PNG charts")
    b.add_argument("--out", default=None, help="report folder (default ./outpost-bench-<date>); "
                                                "must not exist or be empty")
    b.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 cores")
    b.add_argument("--device", default="auto", help="auto (CPU, plus GPU when present), cpu or cuda")
    b.add_argument("--only", default="embeddings,index,batch",
                   help="comma list of sections to run: embeddings, index, batch (default: all)")
    b.add_argument("--model", default=None, help="sentence-transformers model folder (default: the packaged "
                                                  "all-MiniLM-L6-v2)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # Multiplies every size; the test suite runs tiny benchmarks with it.
    b.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)


def _default_out() -> Path:
    base = Path(f"outpost-bench-{time.strftime('%Y-%m-%d')}")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from airflow_outpost.runners.bench.report import check_output_dir, write_report
        from airflow_outpost.runners.bench.run import BenchSettings, run_bench
        from airflow_outpost.runners.errors import (
            BackendUnavailableError,
            ModelNotFoundError,
            RunnerError,
            SettingError,
        )
    except ImportError as exc:
        print(f"outpost: bench needs the runners extra (pip install 'airflow-outpost[runners]'): {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    if args.progress:
        # INFO lines from the runners would tear the progress bars; warnings still show.
        for name in ("runners", "sentence_transformers", "faiss"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).getEffectiveLevel()))
    try:
        settings = BenchSettings(sections=tuple(s.strip() for s in args.only.split(",") if s.strip()),
                                 device=args.device, quick=args.quick, scale=args.scale, model=args.model)
        out = check_output_dir(args.out if args.out else _default_out())
        results = run_bench(settings, progress=args.progress)
        files = write_report(results, out)
    except (SettingError, ModelNotFoundError, BackendUnavailableError) as exc:
        print(f"outpost: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RunnerError as exc:
        print(f"outpost: benchmark failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report: {out / 'report.md'} ({len(files)} files in {out})")
    return 0
