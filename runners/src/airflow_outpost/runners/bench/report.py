"""Shareable report of ``airflow_outpost.runners.bench.run`` results: ``report.md``, ``report.json`` and PNG charts.

``check_output_dir(path)`` fails early (before minutes of measuring) when the report could not
be written there; ``write_report(results, path)`` renders everything into a temporary sibling
directory and renames it to ``path`` at the end, so a failed or cancelled run leaves nothing
half-written. Charts use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from airflow_outpost.runners.bench.run import machine_summary
from airflow_outpost.runners.errors import SettingError
from airflow_outpost.runners.store.atomic import TMP_PREFIX, atomic_directory

__all__ = ["CHARTS", "check_output_dir", "render_markdown", "write_report"]

CHARTS = {
    "embeddings": "embeddings_vs_batch_size.png",
    "index": "index_build_recall.png",
    "batch": "batch_rows_per_s.png",
}


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if a report can be written there: it must not exist (or be an empty
    directory) and its parent must be creatable and writable. Raises ``SettingError``."""
    out = Path(path).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SettingError(f"--out={str(out)!r} is not allowed: it exists and is not an empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=TMP_PREFIX + "probe.", dir=out.parent)
        os.rmdir(probe)
    except OSError as exc:
        raise SettingError(f"--out={str(out)!r} is not writable: {exc.strerror or exc}") from exc
    return out


def write_report(results: dict[str, Any], path: str | os.PathLike[str]) -> list[Path]:
    """Write ``report.md``, ``report.json`` and one PNG per measured section into ``path``, atomically.

    Returns the written files. ``path`` must not exist or be an empty directory (see
    ``check_output_dir``); on any error nothing appears under ``path``.
    """
    out = check_output_dir(path)
    if out.is_dir():
        out.rmdir()  # empty (checked above); atomic_directory renames onto a free name
    with atomic_directory(out) as tmp:
        charts = {}
        for section, name in CHARTS.items():
            if section in results:
                _CHART_FNS[section](results[section], tmp / name)
                charts[section] = name
        report = {**results, "charts": charts}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        written = sorted(p.name for p in tmp.iterdir())
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a report is meant to be shared
    return [out / name for name in written]


# --- markdown -------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: machine, settings, then one section per benchmark with its baseline."""
    m, s = report["machine"], report["settings"]
    parts = [
        "# outpost bench report\n",
        (f"Run {report['started']}, {report.get('seconds', '?')} s, "
        f"{'quick' if s['quick'] else 'full'} sizes (scale {s['scale']}), devices {', '.join(s['devices'])}.\n"),
        "Every ratio is against a baseline measured in the same run on this machine.\n",
        "## Machine\n",
        f"**{machine_summary(m)}**\n",
        _table(["", ""], [["CPU", m["cpu"]], ["cores", m["cores"]], ["memory", f"{m.get('memory_gib', '?')} GiB"],
                          ["GPUs", ", ".join(m.get("gpus", [])) or "none"], ["OS", m["os"]],
                          ["Python", m["python"]]]
               + [[name, v] for name, v in sorted(m.get("versions", {}).items())]),
    ]
    charts = report.get("charts", {})
    if "embeddings" in report:
        e = report["embeddings"]
        b = e["baseline"]
        parts += ["## Embeddings\n",
                  (f"Model `{e['model']}`, {e['texts']} texts of 5-120 words, best of {e['repeats']}. "
                  f"Baseline: `{b['what']}` on {b['device']}, **{b['per_s']} embeddings/s** (ratio 1.0).\n")]
        rows = [[s_["device"], s_["engine"], f"{s_['backend']} / {s_['precision']}", p["batch_size"], p["per_s"],
                 p["vs_baseline"]] for s_ in e["series"] for p in s_["points"]]
        parts.append(_table(["device", "engine", "backend / precision", "batch size", "embeddings/s", "vs baseline"], rows))
        parts.append("\nRunner at its default batching (token budget):\n\n" + _table(
            ["device", "backend / precision", "embeddings/s", "vs baseline", "vs naive (same device)",
             "mean / min cosine vs fp32"],
            [[r["device"], f"{r['backend']} / {r['precision']}", r["per_s"], r["vs_baseline"],
              r["vs_naive_same_device"], f"{r['mean_cosine_vs_fp32']} / {r['min_cosine_vs_fp32']}"]
             for r in e["runner_default"]]))
        parts.append(f"\n![embeddings/s vs batch size]({charts['embeddings']})\n" if "embeddings" in charts else "")
    if "index" in report:
        ix = report["index"]
        parts += ["## Index\n",
                  (f"{ix['vectors']} vectors of {ix['dim']} dimensions ({ix['data']}), {ix['queries']} held-out "
                  f"queries, recall@{ix['k']} against exact search. Baseline: Flat (exact), built in "
                  f"{ix['baseline']['build_s']} s, {ix['baseline']['queries_per_s']} queries/s.\n"),
                  _table(["kind", "build s", "build vs Flat", f"recall@{ix['k']}", "queries/s", "search speed vs Flat"],
                         [[k["kind"], k["build_s"], k["build_vs_flat"], k["recall@10"], k["queries_per_s"],
                           k["search_speedup_vs_flat"]] for k in ix["kinds"]])]
        inc = ix["incremental"]
        parts.append(f"\nIncremental IVF update (+{inc['added']} vectors, -{inc['deleted']} deleted, mode "
                     f"{inc['mode']}): {inc['update_s']} s vs {inc['rebuild_s']} s for a rebuild, "
                     f"**{inc['speedup']}x** faster; recall@10 {inc['update_recall@10']} vs "
                     f"{inc['rebuild_recall@10']}.\n")
        parts.append(f"\n![index build time and recall]({charts['index']})\n" if "index" in charts else "")
    if "batch" in report:
        bt = report["batch"]
        parts += ["## Batch inference\n",
                  (f"PrototypeClassifier over {bt['rows']} rows in {bt['partitions']} Parquet partitions on "
                  f"{bt['device']}, batch size {bt['batch_size']}, {bt['cores']} cores in total on both sides. "
                  f"Baseline: plain loop ({bt['baseline']['what']}), **{bt['baseline']['rows_per_s']} rows/s**. "
                  f"Ray start-up ({bt['ray_init_s']} s) is not counted: a worker with `--ray` reuses one Ray "
                  "for many tasks. `one-shot` builds Ray Data's actor pool for the run; `warm, next run` reuses "
                  "the model actors a previous run kept warm (`BatchConfig.keep_warm_s`).\n"),
                  _table(["engine", "mode", "actors", "threads/actor", "seconds", "rows/s", "vs loop"],
                         [["loop", "-", "-", bt["cores"], bt["baseline"]["seconds"], bt["baseline"]["rows_per_s"], 1.0]]
                         + [["ray", r.get("mode", "one-shot"), r["actors"], r["threads_per_actor"], r["seconds"],
                             r["rows_per_s"], r["vs_loop"]] for r in bt["ray"]])]
        parts.append(f"\n![batch rows/s]({charts['batch']})\n" if "batch" in charts else "")
    return "\n".join(parts)


# --- charts ---------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _chart_embeddings(e: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in e["series"]:
        xs = [p["batch_size"] for p in s["points"]]
        ys = [p["per_s"] for p in s["points"]]
        style = "-o" if s["engine"] == "runner" else "--s"
        ax.plot(xs, ys, style, label=f"{s['engine']} ({s['backend']}, {s['device'].upper()})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(e["batch_sizes"], [str(b) for b in e["batch_sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("embeddings / s")
    ax.set_title(f"Embedding throughput vs batch size ({e['texts']} texts)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chart_index(ix: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    kinds = [k["kind"] for k in ix["kinds"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.8))
    a1.bar(kinds, [k["build_s"] for k in ix["kinds"]], color="#4c72b0")
    a1.set_ylabel("build time (s)")
    a1.set_title(f"Build, {ix['vectors']} x {ix['dim']}")
    a2.bar(kinds, [k["recall@10"] for k in ix["kinds"]], color="#55a868")
    a2.set_ylim(0, 1.05)
    a2.set_ylabel(f"recall@{ix['k']} vs exact")
    a2.set_title("Recall")
    for ax in (a1, a2):
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _chart_batch(bt: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = ["plain loop"] + [f"Ray {r['actors']}x\n{r.get('mode', 'one-shot')}" for r in bt["ray"]]
    values = [bt["baseline"]["rows_per_s"]] + [r["rows_per_s"] for r in bt["ray"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.8))
    ax.bar(names, values, color=["#8c8c8c"] + ["#dd8452"] * len(bt["ray"]))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("rows / s")
    ax.set_title(f"Batch inference, {bt['rows']} rows on {bt['device']}")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_CHART_FNS = {"embeddings": _chart_embeddings, "index": _chart_index, "batch": _chart_batch}
