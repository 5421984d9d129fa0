"""``outpost bench``: a tiny real run (real model, FAISS and Ray) writes a complete report; bad input fails cleanly.

No timing assertions: the figures only have to exist, be positive and carry their ratios.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_outpost.worker.testing.worker_process import run_outpost

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("embeddings_vs_batch_size.png", "index_build_recall.png", "batch_rows_per_s.png")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "report"
    proc = run_outpost("bench", "--quick", "--scale", "0.05", "--device", "cpu", "--out", str(out), timeout_s=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_writes_report_json_and_charts(report: Path) -> None:
    assert sorted(p.name for p in report.iterdir()) == sorted(["report.md", "report.json", *CHARTS])
    assert not list(report.parent.glob(".tmp-*"))  # the staging folder was renamed, not left behind
    for name in CHARTS:
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5_000, name  # a drawn chart, not an empty canvas


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_json_has_every_section_with_positive_figures_and_ratios(report: Path) -> None:
    r = json.loads((report / "report.json").read_text())
    m = r["machine"]
    assert m["cores"] >= 1 and m["memory_gib"] > 0 and m["cpu"]
    assert {"torch", "ray", "numpy"} <= set(m["versions"])
    assert any(k.startswith("faiss") for k in m["versions"])
    assert r["settings"]["devices"] == ["cpu"] and r["settings"]["quick"] is True

    e = r["embeddings"]
    assert e["baseline"]["engine"] == "naive" and e["baseline"]["per_s"] > 0
    assert {(s["engine"], s["device"]) for s in e["series"]} == {("naive", "cpu"), ("runner", "cpu")}
    for s in e["series"]:
        assert [p["batch_size"] for p in s["points"]] == e["batch_sizes"]
        assert all(p["per_s"] > 0 and p["vs_baseline"] > 0 for p in s["points"])
    naive_32 = next(p for s in e["series"] if s["engine"] == "naive" for p in s["points"] if p["batch_size"] == 32)
    assert naive_32["vs_baseline"] == 1.0  # the baseline is the naive call at its default batch size
    (default,) = e["runner_default"]
    assert default["per_s"] > 0 and default["vs_naive_same_device"] > 0
    assert 0.9 < default["mean_cosine_vs_fp32"] <= 1.0001

    ix = r["index"]
    assert [k["kind"] for k in ix["kinds"]] == ["flat", "ivf", "hnsw"]
    flat = ix["kinds"][0]
    assert flat["recall@10"] == 1.0 and flat["build_vs_flat"] == 1.0 and flat["search_speedup_vs_flat"] == 1.0
    for k in ix["kinds"]:
        assert k["build_s"] > 0 and k["queries_per_s"] > 0 and 0 < k["recall@10"] <= 1
        assert k["build_vs_flat"] > 0 and k["search_speedup_vs_flat"] > 0
    inc = ix["incremental"]
    assert inc["mode"] == "incremental" and inc["update_s"] > 0 and inc["rebuild_s"] > 0 and inc["speedup"] > 0

    b = r["batch"]
    assert b["baseline"]["engine"] == "loop" and b["baseline"]["rows_per_s"] > 0
    assert b["ray"] and all(x["rows_per_s"] > 0 and x["vs_loop"] > 0 for x in b["ray"])
    assert {x["mode"] for x in b["ray"]} == {"one-shot", "warm, first run", "warm, next run"}
    assert r["charts"] == dict(zip(("embeddings", "index", "batch"), CHARTS, strict=True))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_markdown_names_the_machine_and_links_the_charts(report: Path) -> None:
    md = (report / "report.md").read_text()
    m = json.loads((report / "report.json").read_text())["machine"]
    assert m["cpu"] in md and f"{m['cores']} cores" in md
    assert "## Embeddings" in md and "## Index" in md and "## Batch inference" in md
    assert "sentence-transformers/all-MiniLM-L6-v2" in md
    for name in CHARTS:
        assert f"]({name})" in md


@pytest.mark.timeout(200)
def test_only_selected_sections_are_measured_and_charted(tmp_path: Path) -> None:
    """The default-run check (the full run above is slow: Ray alone takes a while on 2 cores)."""
    out = tmp_path / "r"
    proc = run_outpost("bench", "--quick", "--scale", "0.05", "--only", "index", "--no-progress", "--out", str(out),
                       timeout_s=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["index_build_recall.png", "report.json", "report.md"]
    assert (out / "index_build_recall.png").read_bytes().startswith(PNG_MAGIC)
    r = json.loads((out / "report.json").read_text())
    assert "index" in r and "embeddings" not in r and "batch" not in r
    assert r["index"]["baseline"]["kind"] == "flat" and all(k["recall@10"] > 0 for k in r["index"]["kinds"])
    md = (out / "report.md").read_text()
    assert r["machine"]["cpu"] in md and "## Index" in md and "## Embeddings" not in md


def _fails_cleanly(proc, code: int, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("outpost: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_only_section_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "r"
    proc = run_outpost("bench", "--only", "embeddings,gpu-magic", "--out", str(out))
    _fails_cleanly(proc, 2, "--only", "gpu-magic", "embeddings, index, batch")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_out_is_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_outpost("bench", "--quick", "--out", str(blocker / "report"))
    _fails_cleanly(proc, 2, "--out", "not writable")


def test_out_that_holds_files_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_outpost("bench", "--quick", "--out", str(tmp_path))
    _fails_cleanly(proc, 2, "--out", "not an empty directory")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_missing_model_path_is_rejected(tmp_path: Path) -> None:
    out = tmp_path / "r"
    proc = run_outpost("bench", "--quick", "--only", "embeddings", "--model", str(tmp_path / "no-model"),
                       "--out", str(out))
    _fails_cleanly(proc, 2, "no-model", "does not exist")
    assert not out.exists()


def test_failed_report_leaves_nothing_half_written(tmp_path: Path) -> None:
    from airflow_outpost.runners.bench.report import write_report
    from airflow_outpost.runners.bench.run import describe_machine

    out = tmp_path / "r"
    broken = {"machine": describe_machine(), "index": {"kinds": []}}  # chart needs fields that are missing
    with pytest.raises(KeyError):
        write_report(broken, out)
    assert list(tmp_path.iterdir()) == []
