"""Writer processes for the store concurrency tests, and a stand-in embedder.

Run as ``python -m tests.runners.store_writers race ...`` (several threads, each an
``embed_corpus`` followed by a ``build_index``/``update_index``/``promote`` on one name) or
``... hold ...`` (an ``embed_corpus`` that takes the lock and then blocks inside the model, to be
SIGKILLed). The "host" of a process is ``OUTPOST_STORE_LOCK_HOST`` in its environment, so two
processes on one machine act as two hosts sharing a store root.

``HashEmbedder`` stands in for the model: a deterministic vector per text (from its SHA-256) and a
whitespace tokenizer, so a test can recompute every expected vector without loading torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

DIM = 32


def _whitespace_tokenizer(text: str, **_: Any) -> dict[str, Any]:
    return {"offset_mapping": [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]}


class HashEmbedder:
    """The parts of ``Embedder`` that ``embed_corpus`` uses; vectors are a pure function of the text."""

    dim = DIM
    normalize = True
    max_seq_length = 64
    tokenizer = staticmethod(_whitespace_tokenizer)
    record = {"name": "hash-standin", "path": "/dev/null", "revision": None, "weights_sha256": "sha256:" + "0" * 64}

    def __init__(self, block: Path | None = None, delay_s: float = 0.0) -> None:
        self.block = block
        self.delay_s = delay_s  # per embed() call, so a test can kill a run between shards
        self.texts_encoded = 0

    def describe(self) -> dict[str, Any]:
        return {"model": dict(self.record), "backend": "hash", "device": "cpu", "precision": "fp32",
                "dim": self.dim, "max_seq_length": self.max_seq_length, "normalize": True}

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.block is not None:
            # Inside embed_corpus the writer lock is held: say so, then wait to be killed.
            self.block.write_text("holding")
            time.sleep(3600)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.texts_encoded += len(texts)
        return np.stack([vector(t) for t in texts]) if texts else np.zeros((0, DIM), dtype=np.float32)


class PerTextEmbedder(HashEmbedder):
    """``HashEmbedder`` that takes ``seconds_per_text`` per text (sleeping): a shard's cost grows with its rows."""

    def __init__(self, seconds_per_text: float) -> None:
        super().__init__()
        self.seconds_per_text = seconds_per_text

    def embed(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.seconds_per_text * len(texts))
        return super().embed(texts)


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def write_corpus(path: Path, tag: str, n: int = 6) -> Path:
    """A corpus that no other caller writes: every call publishes a new version."""
    docs = [{"id": f"doc-{i}", "text": f"{tag} document {i} " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(i + 3))}
            for i in range(n)]
    docs.append({"id": f"only-{tag}", "text": f"written by {tag}"})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def index_config() -> Any:
    from airflow_outpost.runners.index.build import IndexConfig

    return IndexConfig(kind="flat", eval_queries=8, eval_k=3, min_recall=0.0, threads=1)


def _caller(root: Path, name: str, tag: str, op: int, work: Path, out: dict[str, Any]) -> None:
    from airflow_outpost.runners.embeddings.corpus import embed_corpus
    from airflow_outpost.runners.index.build import build_index, update_index
    from airflow_outpost.runners.index.versions import promote

    emb_dir, idx = root / "embeddings" / name, root / "indexes" / name
    try:
        out["embed"] = embed_corpus(write_corpus(work / f"{tag}.jsonl", tag), store=root, name=name,
                                    embedder=HashEmbedder())
        if op == 0:
            out["index"] = build_index(emb_dir, idx, index_config())
        elif op == 1:
            out["index"] = update_index(emb_dir, idx, index_config())
        elif op == 2:
            out["index"] = build_index(emb_dir, idx, index_config(), auto_promote=False)
            out["promote"] = promote(idx, out["index"]["version"])
        else:
            out["index"] = update_index(emb_dir, idx, index_config(), auto_promote=False)
            out["promote"] = promote(idx, out["index"]["version"])
    except BaseException as exc:  # reported to the test, which fails on it
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def race(args: argparse.Namespace) -> None:
    work = Path(args.work)
    results: list[dict[str, Any]] = [{"tag": f"{args.tag}{i}", "op": i % 4} for i in range(args.threads)]
    go = Path(args.go)
    while not go.exists():  # both processes start their callers together
        time.sleep(0.01)
    threads = [threading.Thread(target=_caller, args=(Path(args.root), args.name, r["tag"], r["op"], work, r))
               for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(args.out).write_text(json.dumps(results, default=str))


def hold(args: argparse.Namespace) -> None:
    from airflow_outpost.runners.embeddings.corpus import embed_corpus

    corpus = write_corpus(Path(args.work) / "held.jsonl", "held")
    embed_corpus(corpus, store=args.root, name=args.name, embedder=HashEmbedder(block=Path(args.ready)))


def write_partitions(directory: Path, partitions: int, docs: int, words: int = 40, seed: int = 0) -> Path:
    """A directory corpus of JSONL partitions with ``docs`` unique documents each (whitespace words)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for p in range(partitions):
        lines = []
        for d in range(docs):
            text = " ".join(f"w{x}" for x in rng.integers(0, 5000, size=words))
            lines.append(json.dumps({"id": f"p{p}-d{d}", "text": text}))
        (directory / f"part-{p:04d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def embed(args: argparse.Namespace) -> None:
    """One embed_corpus run as its own process (to be SIGKILLed, or measured); prints the summary."""
    import resource

    from airflow_outpost.runners.batch.ray_session import RayConfig
    from airflow_outpost.runners.embeddings.corpus import EmbedConfig, embed_corpus

    kw: dict[str, Any] = {}
    if args.engine == "ray":
        kw["ray_config"] = RayConfig(num_cpus=args.ray_cpus)
        kw["config"] = EmbedConfig(shard_rows=args.shard_rows, actors=args.ray_cpus, cpus_per_actor=0.5,
                                   read_cpus=0.25)
    else:
        kw["config"] = EmbedConfig(shard_rows=args.shard_rows)
    started = time.perf_counter()
    out = embed_corpus(args.corpus, store=args.root, name=args.name, embedder=HashEmbedder(delay_s=args.delay_s),
                       engine=args.engine, **kw)
    out["seconds"] = time.perf_counter() - started  # type: ignore[typeddict-unknown-key]
    out["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # type: ignore[typeddict-unknown-key]
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="store_writers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("race")
    for flag in ("--root", "--name", "--tag", "--work", "--go", "--out"):
        r.add_argument(flag, required=True)
    r.add_argument("--threads", type=int, default=4)
    h = sub.add_parser("hold")
    for flag in ("--root", "--name", "--work", "--ready"):
        h.add_argument(flag, required=True)
    e = sub.add_parser("embed")
    for flag in ("--root", "--name", "--corpus"):
        e.add_argument(flag, required=True)
    e.add_argument("--engine", default="local")
    e.add_argument("--shard-rows", type=int, default=4096)
    e.add_argument("--delay-s", type=float, default=0.0)
    e.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    {"race": race, "hold": hold, "embed": embed}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
