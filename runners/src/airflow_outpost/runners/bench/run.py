"""Benchmarks of the runners on this machine, each figure a ratio against a baseline from the same run.

Three sections, each comparing the runner with what a user would write without it:

* ``embeddings``: embeddings/s of ``Embedder`` vs the naive ``SentenceTransformer.encode`` at a
  sweep of batch sizes, per device (CPU, and CUDA when present); the baseline is the naive call
  at its default batch size (32) on the first device.
* ``index``: build time, recall@10 and search queries/s of Flat / IVF / HNSW; recall is against
  exact search, times are against the Flat index; plus an incremental IVF update vs a rebuild.
* ``batch``: rows/s of Ray batch inference vs the plain loop (same model, same total threads).

``run_bench(settings)`` returns the results as a JSON-able dict; ``airflow_outpost.runners.bench.report`` turns
it into Markdown, JSON and PNG charts. The data generators (``make_texts``,
``structured_vectors``, ``write_batch_corpus``) are shared with the scripts in ``benchmarks/``.
Nothing is written outside a temporary directory, which is removed on return or on error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from airflow_outpost.runners.errors import SettingError

if TYPE_CHECKING:
    from airflow_outpost.runners.results import IndexSummary

__all__ = [
    "BATCH_LABELS", "SECTIONS", "BenchSettings", "best_of", "describe_machine", "machine_summary", "make_texts",
    "run_bench", "structured_vectors", "text_vocabulary", "write_batch_corpus", "write_vector_shard",
]

SECTIONS = ("embeddings", "index", "batch")
DEVICES = ("auto", "cpu", "cuda")
NAIVE_BATCH_SIZE = 32  # SentenceTransformer.encode's default: what a user gets without tuning
_VERSIONED = ("torch", "sentence-transformers", "ctranslate2", "onnxruntime", "faiss-cpu", "faiss-gpu", "ray", "numpy", "pyarrow")

BATCH_WORDS = ("market shares bank rates earnings team match goal league season recipe soup bread oven "
               "pasta election vote parliament minister policy guitar album concert band tour").split()
BATCH_LABELS = {"finance": ["financial news"], "sport": ["sports news"], "food": ["cooking"],
                "politics": ["politics"], "music": ["music"]}


# --- settings -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``scale`` multiplies every size (tests use ~0.05); ``quick`` picks small sizes.

    ``model`` None means the packaged all-MiniLM-L6-v2. Raises ``SettingError`` naming the
    setting, the value and what is allowed.
    """

    sections: tuple[str, ...] = SECTIONS
    device: str = "auto"
    quick: bool = False
    scale: float = 1.0
    model: str | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise SettingError(f"--only={','.join(self.sections)!r} is not allowed: "
                               f"use a comma list of {', '.join(SECTIONS)}")
        if self.device not in DEVICES:
            raise SettingError(f"--device={self.device!r} is not allowed: use one of {', '.join(DEVICES)}")
        if not 0 < self.scale <= 100:
            raise SettingError(f"--scale={self.scale!r} is not allowed: must be in (0, 100]")

    def size(self, quick: int, full: int, minimum: int) -> int:
        return max(minimum, int((quick if self.quick else full) * self.scale))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def devices_for(setting: str) -> list[str]:
    """Devices to measure for ``--device``: auto = CPU plus CUDA when present."""
    if setting == "cuda":
        if not _cuda_available():
            raise SettingError("--device='cuda' is not allowed here: no CUDA GPU is visible (use auto or cpu)")
        return ["cuda"]
    if setting == "cpu":
        return ["cpu"]
    return ["cpu", "cuda"] if _cuda_available() else ["cpu"]


# --- machine --------------------------------------------------------------------------------

def describe_machine() -> dict[str, Any]:
    """``{"cpu", "cores", "memory_gib", "os", "python", "versions", "gpus"?}`` for this machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform.processor() is the best there is
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(),
                            "python": platform.python_version()}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    info["versions"] = versions
    if _cuda_available():
        import torch

        info["gpus"] = [f"{torch.cuda.get_device_name(i)} "
                        f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                        for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def machine_summary(info: dict[str, Any] | None = None) -> str:
    """One line: ``"<cpu>, <n> cores, <m> GiB, Python x.y[, GPUs: ...]"``."""
    info = info or describe_machine()
    mem = f", {info['memory_gib']} GiB" if "memory_gib" in info else ""
    gpus = f", GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else ""
    return f"{info['cpu']}, {info['cores']} cores{mem}, Python {info['python']}{gpus}"


# --- data -----------------------------------------------------------------------------------

def text_vocabulary(tokenizer: Any) -> list[str]:
    """Alphabetic words (3+ letters) of a tokenizer's vocabulary, sorted: stable input for ``make_texts``."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2)


def make_texts(n: int, seed: int, vocab: Sequence[str]) -> list[str]:
    """``n`` texts of 5-120 random words from ``vocab``: mixed lengths, as real corpora have."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 120))) for _ in range(n)]


def structured_vectors(n: int, dim: int, seed: int, latent: int = 32, clusters: int = 200) -> np.ndarray:
    """Unit vectors with low-dimensional structure: clusters in a latent space projected to ``dim``.

    Random Gaussian vectors would make every neighbour equally far and recall meaningless. The
    projection and centres are fixed (seed 1234), so different ``seed`` draws share one space.
    """
    srng = np.random.default_rng(1234)
    proj = srng.standard_normal((latent, dim)).astype(np.float32)
    centres = srng.standard_normal((clusters, latent)).astype(np.float32) * 2.0
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # bounded memory for millions of rows
        m = min(100_000, n - start)
        z = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, latent)).astype(np.float32)
        x = z @ proj + 0.1 * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_vector_shard(emb: Path, stem: str, x: np.ndarray, first_id: int) -> None:
    """Write ``x`` as an embeddings shard (``<stem>.npy`` + ``<stem>.ids.npy``) with ids from ``first_id``."""
    emb.mkdir(parents=True, exist_ok=True)
    np.save(emb / f"{stem}.npy", x)
    np.save(emb / f"{stem}.ids.npy", np.arange(first_id, first_id + len(x), dtype=np.int64))


def write_batch_corpus(directory: Path, rows: int, partitions: int) -> None:
    """Parquet partitions of ``id``/``text`` rows (12-28 topic words each) for batch inference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    per = rows // partitions
    for p in range(partitions):
        texts = [" ".join(rng.choice(BATCH_WORDS, size=int(rng.integers(12, 28)))) for _ in range(per)]
        pq.write_table(pa.table({"id": np.arange(p * per, (p + 1) * per), "text": texts}),
                       directory / f"p{p:04d}.parquet")


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# --- progress -------------------------------------------------------------------------------

class _Steps:
    """A progress bar over named steps (tqdm on stderr); a no-op when ``enabled`` is False."""

    def __init__(self, section: str, labels: Iterable[str], enabled: bool) -> None:
        self.labels = list(labels)
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.labels), desc=section, unit="step", leave=True)

    def __enter__(self) -> _Steps:
        return self

    def step(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(label)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _ratio(a: float | None, b: float | None) -> float:
    # None: a rate the runner could not measure (zero seconds); no ratio either.
    return round(a / b, 3) if a is not None and b is not None and b > 0 else 0.0


def _recall(summary: IndexSummary) -> float | None:
    """An index build's recall@k, rounded; None only for a build without evaluation queries."""
    return None if summary["recall"] is None else round(summary["recall"], 4)


# --- sections -------------------------------------------------------------------------------

def _embed_device(settings: BenchSettings, model: Path, device: str, n: int, sizes: list[int], repeats: int,
                  bar: _Steps) -> tuple[list[dict[str, Any]], dict[str, Any], float, str]:
    """One device: naive and runner points per batch size, the runner at its defaults, quality."""
    from sentence_transformers import SentenceTransformer

    from airflow_outpost.runners.embeddings.embedder import Embedder

    naive = SentenceTransformer(str(model), device=device, local_files_only=True)
    texts = make_texts(n, 1, text_vocabulary(naive.tokenizer))
    # None: the packaged model, so the report names it rather than its folder.
    runner = Embedder(None if settings.model is None else model, device=device)
    naive.encode(texts[:32], batch_size=32)  # warm-up both sides
    runner.embed(texts[:32])
    default_bs, default_tokens = runner.max_batch_size, runner.batch_tokens
    points: dict[str, list[dict[str, Any]]] = {"naive": [], "runner": []}
    for bs in sizes:
        bar.step(f"{device} naive bs={bs}")
        t = best_of(functools.partial(naive.encode, texts, batch_size=bs), repeats)
        points["naive"].append({"batch_size": bs, "per_s": round(n / t, 1)})
        bar.done()
        bar.step(f"{device} runner bs={bs}")
        # The runner cuts batches by a token budget too; lift it so the batch size binds.
        runner.max_batch_size, runner.batch_tokens = bs, bs * runner.max_seq_length
        t = best_of(lambda: runner.embed(texts), repeats)
        points["runner"].append({"batch_size": bs, "per_s": round(n / t, 1)})
        bar.done()
    runner.max_batch_size, runner.batch_tokens = default_bs, default_tokens
    t_default = best_of(lambda: runner.embed(texts), repeats)
    reference = naive.encode(texts, batch_size=NAIVE_BATCH_SIZE, normalize_embeddings=True)
    cosine = (runner.embed(texts) * reference).sum(axis=1)
    desc = runner.describe()
    series = [{"device": device, "engine": engine,
               "backend": "sentence-transformers" if engine == "naive" else desc["backend"],
               "precision": "fp32" if engine == "naive" else desc["precision"], "points": pts}
              for engine, pts in points.items()]
    if NAIVE_BATCH_SIZE in sizes:
        naive_default = next(p["per_s"] for p in points["naive"] if p["batch_size"] == NAIVE_BATCH_SIZE)
    else:
        naive_default = round(n / best_of(lambda: naive.encode(texts, batch_size=NAIVE_BATCH_SIZE), repeats), 1)
    default = {"device": device, "backend": desc["backend"], "precision": desc["precision"],
               "max_batch_size": default_bs, "batch_tokens": default_tokens, "per_s": round(n / t_default, 1),
               "vs_naive_same_device": _ratio(n / t_default, naive_default),
               "mean_cosine_vs_fp32": round(float(cosine.mean()), 5),
               "min_cosine_vs_fp32": round(float(cosine.min()), 5)}
    return series, default, naive_default, desc["model"]["name"]


def bench_embeddings(settings: BenchSettings, model: Path, devices: list[str], progress: bool) -> dict[str, Any]:
    """Embeddings/s vs batch size, naive encode vs runner, per device. See the module docstring."""
    n = settings.size(256, 1000, 32)
    sizes = [8, 32, 128] if settings.quick else [1, 8, 32, 64, 128, 256]
    repeats = 1 if settings.quick else 2
    labels = [f"{d} {e} bs={b}" for d in devices for b in sizes for e in ("naive", "runner")]
    out: dict[str, Any] = {"texts": n, "batch_sizes": sizes, "repeats": repeats, "series": [], "runner_default": []}
    with _Steps("embeddings", labels, progress) as bar:
        for device in devices:
            series, default, naive_default, out["model"] = _embed_device(settings, model, device, n, sizes,
                                                                         repeats, bar)
            out["series"] += series
            out["runner_default"].append(default)
            out.setdefault("baseline", {"engine": "naive", "device": device, "batch_size": NAIVE_BATCH_SIZE,
                                        "per_s": naive_default,
                                        "what": f"SentenceTransformer.encode(texts, batch_size={NAIVE_BATCH_SIZE})"})
    base = out["baseline"]["per_s"]
    for s in out["series"]:
        for p in s["points"]:
            p["vs_baseline"] = _ratio(p["per_s"], base)
    for r in out["runner_default"]:
        r["vs_baseline"] = _ratio(r["per_s"], base)
    return out


def bench_index(settings: BenchSettings, devices: list[str], work: Path, progress: bool) -> dict[str, Any]:
    """Build time, recall@10 (vs exact search) and queries/s (vs Flat) per index kind; incremental update."""
    from airflow_outpost.runners.index.build import IndexConfig, build_index, update_index
    from airflow_outpost.runners.index.search import IndexSearcher

    n, dim = settings.size(20_000, 100_000, 2_000), 384
    n_queries = 200
    device = "gpu" if "cuda" in devices else "cpu"
    emb = work / "emb"
    x = structured_vectors(n, dim, seed=0)
    for i, start in enumerate(range(0, n, 100_000)):
        write_vector_shard(emb, f"shard-{i:04d}", x[start:start + 100_000], start)
    del x
    queries = structured_vectors(n_queries, dim, seed=7)
    configs = {
        "flat": IndexConfig(kind="flat", min_recall=0.0, device=device),
        "ivf": IndexConfig(kind="ivf", nprobe=32, min_recall=0.0, device=device),
        "hnsw": IndexConfig(kind="hnsw", hnsw_m=32, hnsw_ef_construction=80, hnsw_ef_search=64, min_recall=0.0),
    }
    labels = [f"build+search {k}" for k in configs] + ["incremental ivf", "rebuild ivf"]
    kinds: list[dict[str, Any]] = []
    with _Steps("index", labels, progress) as bar:
        for kind, cfg in configs.items():
            bar.step(f"build {kind}")
            built = build_index(emb, work / f"idx-{kind}", cfg)
            searcher = IndexSearcher(work / f"idx-{kind}", k=10)
            search_s = best_of(functools.partial(searcher.search, queries), 3)
            kinds.append({"kind": kind, "params": searcher.manifest["params"], "build_s": built["seconds"],
                          "recall@10": _recall(built),
                          "queries_per_s": round(n_queries / search_s, 1)})
            bar.done()
        flat = kinds[0]
        for row in kinds:
            row["build_vs_flat"] = _ratio(row["build_s"], flat["build_s"])
            row["search_speedup_vs_flat"] = _ratio(row["queries_per_s"], flat["queries_per_s"])
        # Incremental: add 1% new vectors and delete 0.1%, vs a full rebuild of the same data (IVF).
        bar.step("incremental ivf")
        write_vector_shard(emb, "shard-new", structured_vectors(max(1, n // 100), dim, seed=1), 10 * n)
        (emb / "deleted_ids.json").write_text(str(list(range(0, n, 1000))))
        inc = update_index(emb, work / "idx-ivf")
        bar.done()
        bar.step("rebuild ivf")
        full = build_index(emb, work / "idx-ivf-rebuild", configs["ivf"])
        bar.done()
    return {
        "vectors": n, "dim": dim, "queries": n_queries, "k": 10, "device": device,
        "data": "clustered vectors in a 32-d latent space projected to 384-d, unit-normalised",
        "baseline": {"kind": "flat", "what": "exact search (IndexFlatIP)", "build_s": flat["build_s"],
                     "queries_per_s": flat["queries_per_s"]},
        "kinds": kinds,
        "incremental": {"added": max(1, n // 100), "deleted": len(range(0, n, 1000)), "mode": inc["mode"],
                        "update_s": inc["seconds"], "update_recall@10": _recall(inc),
                        "rebuild_s": full["seconds"], "rebuild_recall@10": _recall(full),
                        "speedup": _ratio(full["seconds"], inc["seconds"])},
    }


def ray_batch_rows(work: Path, kw: dict[str, Any], actors: int, cores: int, batch_size: int,
                   loop_rows_per_s: float | None) -> list[dict[str, Any]]:
    """Ray runs with ``actors`` actors on the session's Ray, three ways, each vs the plain loop.

    ``one-shot``: Ray Data's actor pool, built for this run (start, imports, model load
    included). ``warm, first run``: the same run starting named warm actors. ``warm, next
    run``: a second run reusing them, as a later task on a worker with ``--ray`` does.
    The warm actors are released before returning.
    """
    from airflow_outpost.runners.batch.example_models import PrototypeClassifier
    from airflow_outpost.runners.batch.inference import BatchConfig, run_batch_inference
    from airflow_outpost.runners.batch.warm_actors import release_idle

    threads = max(1, cores // actors)
    kwargs = {**kw, "threads": threads}
    rows: list[dict[str, Any]] = []
    # Actors reserve a little under their share so the light read tasks always fit.
    cpus = round((cores - 0.25) / actors, 3)
    for mode, keep in (("one-shot", 0.0), ("warm, first run", 600.0), ("warm, next run", 600.0)):
        cfg = BatchConfig(batch_size=batch_size, actors=actors, cpus_per_actor=cpus, keep_warm_s=keep)
        res = run_batch_inference(work / "in", work / f"ray-{actors}-{len(rows)}", PrototypeClassifier, kwargs,
                                  config=cfg)
        rows.append({"actors": actors, "threads_per_actor": threads, "mode": mode, "seconds": res["seconds"],
                     "rows_per_s": res["rows_per_s"], "vs_loop": _ratio(res["rows_per_s"], loop_rows_per_s)})
    release_idle(need_cpus=float("inf"))
    return rows


def bench_batch(settings: BenchSettings, model: Path, work: Path, progress: bool) -> dict[str, Any]:
    """Rows/s of Ray batch inference (1 and all-cores actors) vs the plain loop, same total threads."""
    from airflow_outpost.runners.batch.example_models import PrototypeClassifier
    from airflow_outpost.runners.batch.inference import run_plain_loop
    from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

    parts = 4 if settings.quick else 16
    rows = settings.size(512, 4096, 64) // parts * parts
    cores = os.cpu_count() or 1
    batch_size = 64
    gpu = "cuda" in devices_for(settings.device)
    # On a GPU both sides use it; Ray then runs one actor per GPU (here: one).
    actor_counts = [1] if gpu else sorted({1, cores})
    kw = {"model_path": str(model), "labels": BATCH_LABELS, "batch_size": batch_size,
          "device": "cuda" if gpu else "cpu"}
    labels = ["warm-up", "plain loop", "ray start"] + [f"ray {a} actor(s)" for a in actor_counts]
    ray_rows = []
    with _Steps("batch", labels, progress) as bar:
        write_batch_corpus(work / "in", rows, parts)
        bar.step("warm-up")
        # Warm the page cache and torch once so neither side pays first-run costs alone.
        run_plain_loop(work / "in", work / "warm", PrototypeClassifier, {**kw, "threads": cores}, batch_size=batch_size)
        bar.done()
        bar.step("plain loop")
        loop = run_plain_loop(work / "in", work / "loop", PrototypeClassifier, {**kw, "threads": cores},
                              batch_size=batch_size)
        bar.done()
        bar.step("ray start")
        t0 = time.perf_counter()
        with ray_session(RayConfig(num_cpus=cores)):
            ray_init_s = round(time.perf_counter() - t0, 2)
            bar.done()
            for n in actor_counts:
                bar.step(f"ray {n} actor(s)")
                ray_rows += ray_batch_rows(work, kw, n, cores, batch_size, loop["rows_per_s"])
                bar.done()
    return {"rows": rows, "partitions": parts, "cores": cores, "batch_size": batch_size, "device": kw["device"],
            "ray_init_s": ray_init_s,
            "baseline": {"engine": "loop", "what": "read, run the model, write, one process with all cores",
                         "seconds": loop["seconds"], "rows_per_s": loop["rows_per_s"]},
            "ray": ray_rows}


def run_bench(settings: BenchSettings, *, progress: bool = True) -> dict[str, Any]:
    """Run the selected sections; return ``{"settings", "machine", "started", "seconds", <section>...}``.

    Raises ``SettingError`` (bad device), ``ModelNotFoundError`` (bad model path) before any
    measuring starts. Work files live in a temporary directory removed on return or error.
    """
    from airflow_outpost.runners.embeddings.embedder import resolve_model_path

    devices = devices_for(settings.device)
    model = resolve_model_path(settings.model)
    started = time.time()
    result: dict[str, Any] = {
        "schema": 1, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "settings": {**dataclasses.asdict(settings), "model": str(model), "devices": devices},
        "machine": describe_machine(),
    }
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        work = Path(tmp)
        if "embeddings" in settings.sections:
            result["embeddings"] = bench_embeddings(settings, model, devices, progress)
        if "index" in settings.sections:
            result["index"] = bench_index(settings, devices, work / "index", progress)
        if "batch" in settings.sections:
            result["batch"] = bench_batch(settings, model, work / "batch", progress)
    result["seconds"] = round(time.time() - started, 1)
    return result
