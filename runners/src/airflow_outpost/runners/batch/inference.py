"""Batch inference over local Parquet/JSONL partitions, on Ray Data or as a plain in-process loop.

``run_batch_inference`` streams the partitions through Ray Data: read tasks, a pool of actors
that each construct the model class once, and the driver writing results, all overlapping.
``run_plain_loop`` is the baseline a user would write by hand (read a partition, infer, write)
and produces the same output. Both write one ``part-NNNNN.parquet`` per input partition, rows
in input order, plus ``manifest.json`` (inputs + hashes, model + weights hash, code version)
inside a directory that appears under its final name only when complete (``atomic_directory``),
and return a ``airflow_outpost.runners.results.BatchSummary``. pyarrow, numpy and Ray are imported
when a run starts, not with this module.

The model is any class following ``airflow_outpost.runners.batch.example_models``: ``__init__(**model_kwargs)`` does the
expensive setup, ``__call__(batch: dict[str, np.ndarray]) -> dict`` returns one row per input row.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session
from airflow_outpost.runners.batch.warm_actors import WarmPool
from airflow_outpost.runners.errors import InputError, SettingError
from airflow_outpost.runners.results import BatchSummary, WarmActorsSummary
from airflow_outpost.runners.store.atomic import (
    TMP_PREFIX,
    atomic_directory,
    atomic_write_json,
    atomic_writer,
    fsync_dir,
)
from airflow_outpost.runners.store.region_store import code_version, hash_file, hash_text, input_record, model_record

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["BatchConfig", "BatchSummary", "list_partitions", "run_batch_inference", "run_plain_loop"]

log = logging.getLogger(__name__)
_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
_PATH_COLUMN = "__outpost_path"


@dataclass(frozen=True)
class BatchConfig:
    """How to run inference. ``actors`` model replicas with ``cpus_per_actor`` CPUs each;
    ``gpus_per_actor=None`` means 1 when the cluster has GPUs, else 0. ``batch_size`` rows go
    to each ``__call__``. ``read_cpus`` is what each read task reserves: actors must leave
    that much free or reading starves (Ray Data would wait forever), which is checked up front.
    ``log_every_s`` paces the progress lines in the task log.

    ``keep_warm_s > 0`` keeps the model loaded in named, detached actors on the Ray cluster for
    that long after their last batch, so the next run with the same model and resources starts
    computing at once (``airflow_outpost.runners.batch.warm_actors``); this only outlives the call when Ray does (the
    worker's ``--ray``, or an existing cluster). ``None`` reads ``OUTPOST_RAY_KEEP_WARM_S``
    (set by the worker; unset = 0: actors live for one run, built by Ray Data's actor pool)."""

    batch_size: int = 256
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    read_cpus: float = 0.25
    log_every_s: float = 10.0
    keep_warm_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatchConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ValueError("BatchConfig.cpus_per_actor/gpus_per_actor must be >= 0")
        if not 0 < self.read_cpus <= 1:
            raise ValueError(f"BatchConfig.read_cpus={self.read_cpus!r} is invalid: must be in (0, 1]")
        if self.keep_warm_s is not None and self.keep_warm_s < 0:
            raise ValueError(f"BatchConfig.keep_warm_s={self.keep_warm_s!r} is invalid: must be >= 0")

    def warm_seconds(self) -> float:
        """``keep_warm_s``, or ``OUTPOST_RAY_KEEP_WARM_S`` when it is None (0 if unset)."""
        if self.keep_warm_s is not None:
            return self.keep_warm_s
        raw = os.environ.get("OUTPOST_RAY_KEEP_WARM_S", "").strip()
        try:
            value = float(raw) if raw else 0.0
        except ValueError:
            raise ValueError(f"OUTPOST_RAY_KEEP_WARM_S={raw!r} is invalid: must be a number of seconds") from None
        if value < 0:
            raise ValueError(f"OUTPOST_RAY_KEEP_WARM_S={raw!r} is invalid: must be >= 0")
        return value

    def check_fits(self, cluster_cpus: float) -> None:
        """Raise ValueError if the actors leave no CPU for the read tasks on a cluster of ``cluster_cpus``."""
        need = self.actors * self.cpus_per_actor + self.read_cpus
        if need > cluster_cpus + 1e-9:
            raise ValueError(
                f"BatchConfig asks for actors={self.actors} x cpus_per_actor={self.cpus_per_actor:g} + "
                f"read_cpus={self.read_cpus:g} = {need:g} CPUs but the Ray cluster has {cluster_cpus:g}; "
                "lower cpus_per_actor (torch threads are set by the model) or actors"
            )


def list_partitions(input_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Input partitions in a stable order: the files given, or the *.parquet/*.jsonl of a directory.

    Raises InputError if there are none, or if Parquet and JSONL are mixed.
    """
    if isinstance(input_path, (str, os.PathLike)):
        root = Path(input_path)
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix in _FORMATS and not p.name.startswith((".", TMP_PREFIX)))
        else:
            files = [root]
    else:
        files = [Path(p) for p in input_path]
    if not files:
        raise InputError("no .parquet or .jsonl partitions found", path=str(input_path))
    for f in files:
        if not f.is_file():
            raise InputError("input partition does not exist", path=str(f))
    formats = {_FORMATS.get(f.suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise InputError(f"partitions must all be .parquet or all .jsonl, got {sorted(map(str, formats))}",
                         path=str(input_path))
    return files


def _read_partition(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path) if path.suffix == ".parquet" else pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read partition: {exc}", path=str(path)) from exc


def _count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _check_rows(out: Mapping[str, Any], n: int, where: str) -> pa.Table:
    import numpy as np
    import pyarrow as pa

    table = pa.table({k: np.asarray(v) for k, v in out.items()})
    if table.num_rows != n:
        raise InputError(f"model returned {table.num_rows} rows for {n} input rows", path=where)
    return table


def _read_task(batch: pa.Table) -> pa.Table:
    """Ray task: read one partition and tag its rows with the partition path."""
    import pyarrow as pa

    path = batch.column(_PATH_COLUMN)[0].as_py()
    table = _read_partition(Path(path))
    return table.append_column(_PATH_COLUMN, pa.array([path] * table.num_rows, type=pa.string()))


class _ModelActor:
    """Ray actor wrapper: builds the user's model once, carries the partition path past it."""

    def __init__(self, model_cls: type, model_kwargs: Mapping[str, Any]) -> None:
        self.model = model_cls(**model_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        paths = batch.pop(_PATH_COLUMN)
        table = _check_rows(self.model(batch), len(paths), str(paths[0]) if len(paths) else "?")
        return table.append_column(_PATH_COLUMN, pa.array(paths.tolist(), type=pa.string()))

    def write_partition(self, source: str, dest: str, batch_size: int, record: dict[str, Any]) -> dict[str, Any]:
        """Infer one whole partition and commit its output here, where it was computed.

        The Parquet file is committed first (temp + fsync + rename), then its record
        (``<part>.json``: input hash, run key, rows, node) that tells a rerun it may skip it.
        Memory: one partition's input and its output, never the dataset.
        """
        import pyarrow.parquet as pq

        from airflow_outpost.runners.embeddings.partitions import node_identity

        table = _read_partition(Path(source))
        out_path = Path(dest)
        rows = 0
        with atomic_writer(out_path) as fh:
            writer = None
            try:
                for start in range(0, max(table.num_rows, 1), batch_size):
                    chunk = table.slice(start, batch_size)
                    if chunk.num_rows == 0:
                        break
                    out = _check_rows(self.model(_to_numpy(chunk)), chunk.num_rows, source)
                    if writer is None:
                        writer = pq.ParquetWriter(fh, out.schema)
                    writer.write_table(out)
                    rows += out.num_rows
            except BaseException:
                # Close it while its file is open: the temp file is discarded anyway, and a writer
                # left to the garbage collector would write its footer to a closed file.
                if writer is not None:
                    writer.close()
                raise
            if writer is None:
                import pyarrow as pa

                pq.write_table(pa.table({}), fh)
            else:
                writer.close()
        done = {**record, "rows": rows, "sha256": hash_file(out_path), **node_identity()}
        atomic_write_json(out_path.with_suffix(".json"), done)
        return done


class _PartitionWriter:
    """Writes rows to ``part-NNNNN.parquet`` inside the output temp dir as they stream in, in order."""

    def __init__(self, tmp: Path, partitions: list[Path], total: int, log_every_s: float) -> None:
        self.tmp, self.total, self.log_every_s = tmp, total, log_every_s
        self.index = {str(p): i for i, p in enumerate(partitions)}
        self.index.update({str(p.resolve()): i for i, p in enumerate(partitions)})
        self.partitions = partitions
        self.rows = [0] * len(partitions)
        self._writer: pq.ParquetWriter | None = None
        self._current: int | None = None
        self.done, self._started, self._last_log = 0, time.perf_counter(), time.perf_counter()

    def name(self, i: int) -> str:
        return f"part-{i:05d}.parquet"

    def write(self, part: int, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if part != self._current:
            self._close()
            self._current = part
            self._writer = pq.ParquetWriter(self.tmp / self.name(part), table.schema)
        assert self._writer is not None
        self._writer.write_table(table)
        self.rows[part] += table.num_rows
        self.done += table.num_rows
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            rate = self.done / max(now - self._started, 1e-9)
            log.info("batch inference: %d/%d rows (%.1f rows/s)", self.done, self.total, rate)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, schema: pa.Schema | None) -> list[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._close()
        for i, n in enumerate(self.rows):
            # A partition with no rows still gets its (empty) output, so outputs map 1:1 to inputs.
            if n == 0 and not (self.tmp / self.name(i)).exists():
                pq.write_table(pa.table({}) if schema is None else schema.empty_table(), self.tmp / self.name(i))
        return [{"file": self.name(i), "source": str(p), "rows": self.rows[i]} for i, p in enumerate(self.partitions)]


def _lineage(partitions: list[Path], model_cls: type, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = {"class": f"{model_cls.__module__}.{model_cls.__qualname__}"}
    path = model_kwargs.get("model_path")
    if path is not None and Path(path).is_dir():
        model.update(model_record(path))
    model["kwargs"] = {k: v for k, v in model_kwargs.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    return {"inputs": [input_record(p) for p in partitions], "model": model, "code_version": code_version()}


def _summary(output_dir: Path, outputs: list[dict[str, Any]], engine: str, seconds: float) -> BatchSummary:
    rows = sum(o["rows"] for o in outputs)
    return {"output_dir": str(output_dir), "engine": engine, "partitions": len(outputs), "rows": rows,
            "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
            "manifest": str(output_dir / "manifest.json")}


def run_plain_loop(
    input_path: Any, output_dir: str | os.PathLike[str], model_cls: type,
    model_kwargs: Mapping[str, Any] | None = None, *, batch_size: int = 256, log_every_s: float = 10.0,
) -> BatchSummary:
    """Baseline: in this process, for each partition read it, call the model per batch, write it.

    Same output layout and manifest as ``run_batch_inference``. Returns a ``BatchSummary``
    (``rows``, ``seconds``, ``rows_per_s``, ``output_dir``; ``engine="loop"``). ``output_dir``
    must not exist; a crash or cancel leaves only a ``.tmp-`` directory next to it, so a retry
    starts clean.
    """
    started = time.perf_counter()
    model_kwargs = dict(model_kwargs or {})
    output_dir = Path(output_dir)
    partitions = list_partitions(input_path)
    model = model_cls(**model_kwargs)
    total = sum(_count_rows(p) for p in partitions)
    with atomic_directory(output_dir) as tmp:
        writer = _PartitionWriter(tmp, partitions, total, log_every_s)
        schema = None
        for i, part in enumerate(partitions):
            table = _read_partition(part)
            for start in range(0, table.num_rows, batch_size):
                chunk = table.slice(start, batch_size)
                out = _check_rows(model(_to_numpy(chunk)), chunk.num_rows, str(part))
                schema = out.schema
                writer.write(i, out)
        outputs = writer.finish(schema)
        seconds = time.perf_counter() - started
        atomic_write_json(tmp / "manifest.json", {**_lineage(partitions, model_cls, model_kwargs), "engine": "loop",
                                                  "outputs": outputs, "rows": writer.done, "seconds": seconds})
    return _summary(output_dir, outputs, "loop", seconds)


def _gpus_per_actor(config: BatchConfig, resources: Mapping[str, float]) -> float:
    if config.gpus_per_actor is not None:
        return config.gpus_per_actor
    return 1.0 if resources.get("GPU", 0) > 0 else 0.0


def run_batch_inference(
    input_path: Any, output_dir: str | os.PathLike[str], model_cls: type,
    model_kwargs: Mapping[str, Any] | None = None, *, config: BatchConfig | None = None,
    ray_config: RayConfig | None = None, engine: str = "ray",
) -> BatchSummary:
    """Run ``model_cls`` over every row of the input partitions on Ray; write results locally.

    ``engine="local"`` runs the same partition commits, resume and manifest in this process
    (one model, partitions one after the other; ``ray_config``, ``actors`` and warm actors do
    not apply, an explicit ``keep_warm_s > 0`` is refused); ``"ray"`` (the default, as since
    0.1) is below.

    Ray is started on demand or joined per ``ray_config`` (see ``airflow_outpost.runners.batch.ray_session``) and
    shut down afterwards unless the caller had it running. Each actor builds the model once.
    On GPU clusters actors get ``gpus_per_actor`` GPUs and ``device="cuda"`` if the model takes
    a ``device`` argument and none was given. Output rows equal ``run_plain_loop``'s, row for
    row. Returns a ``BatchSummary`` (``rows``, ``seconds``, ``rows_per_s``, ``actors``,
    ``ray_address``, and ``warm_actors`` when ``keep_warm_s > 0``; ``engine="ray"``).
    ``output_dir`` must not exist; a failure or cancel leaves no output under its final name.
    Without warm actors, each partition is inferred and committed (temp + rename) by the actor
    that computed it, on its node, into ``.partial-<output name>-<run key>`` next to
    ``output_dir`` (the run key hashes the inputs, the model and the code version); a rerun of the
    same run skips the partitions committed there (``resumed_partitions``), and the manifest,
    which records each partition's node, is written last before one rename publishes the
    directory. Actors on a node that dies are restarted elsewhere by Ray and their partitions
    redone. With warm actors the driver writes (as before) and a failure leaves only a ``.tmp-``
    directory; a batch whose warm actor died is resent once to a new actor.
    """
    started = time.perf_counter()
    config = config or BatchConfig()
    if engine not in ("local", "ray"):
        raise SettingError(f"run_batch_inference: engine={engine!r} is invalid: must be 'local' or 'ray'")
    # The worker's OUTPOST_RAY_KEEP_WARM_S is for Ray runs; only an explicit setting is refused here.
    if engine == "local" and config.keep_warm_s:
        raise SettingError("run_batch_inference: keep_warm_s keeps Ray actors warm; it needs engine='ray'")
    model_kwargs = dict(model_kwargs or {})
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"refusing to overwrite existing output directory {output_dir}")
    partitions = list_partitions(input_path)
    if engine == "local":
        outputs, resumed = _run_where_computed(partitions, output_dir, model_cls, model_kwargs, config, 0.0, started,
                                               on_ray=False)
        local = _summary(output_dir, outputs, "local", time.perf_counter() - started)
        local["actors"], local["gpus_per_actor"], local["ray_address"] = 1, 0.0, None
        local["resumed_partitions"] = resumed
        return local
    total = sum(_count_rows(p) for p in partitions)
    with ray_session(ray_config) as session:
        gpus = _gpus_per_actor(config, session["resources"])
        config.check_fits(session["resources"].get("CPU", 0.0))
        if gpus and "device" not in model_kwargs and "device" in inspect.signature(model_cls).parameters:
            model_kwargs["device"] = "cuda"
        keep_warm_s = config.warm_seconds()
        log.info("batch inference: %d rows in %d partitions, %d actor(s), %s GPU/actor%s",
                 total, len(partitions), config.actors, gpus,
                 f", kept warm {keep_warm_s:g}s" if keep_warm_s else "")
        warm: WarmActorsSummary | None = None
        resumed = 0
        if not keep_warm_s:
            outputs, resumed = _run_where_computed(partitions, output_dir, model_cls, model_kwargs, config, gpus,
                                                   started, on_ray=True)
            seconds = time.perf_counter() - started
        else:
            outputs, warm, seconds = _run_warm(partitions, output_dir, model_cls, model_kwargs, config, gpus,
                                               total, keep_warm_s, started)
    summary = _summary(output_dir, outputs, "ray", seconds)
    summary["actors"], summary["gpus_per_actor"], summary["ray_address"] = config.actors, gpus, session["address"]
    if warm is not None:
        summary["warm_actors"] = warm
    else:
        summary["resumed_partitions"] = resumed
    return summary


def _run_where_computed(
    partitions: list[Path], output_dir: Path, model_cls: type, model_kwargs: Mapping[str, Any],
    config: BatchConfig, gpus: float, started: float, *, on_ray: bool,
) -> tuple[list[dict[str, Any]], int]:
    """Each partition is inferred and committed by a model actor, on its node, into a staging
    directory named by the run (input hashes, model, code version); the driver only routes paths
    and collects records (``on_ray=False``: one model in this process does the same, partition
    after partition). A rerun of the same run skips the partitions already committed there.
    The manifest is written last, then the staging directory is renamed to ``output_dir``."""
    lineage = _lineage(partitions, model_cls, model_kwargs)
    key_desc = {"inputs": [i["sha256"] for i in lineage["inputs"]], "model": lineage["model"],
                "code": lineage["code_version"]}
    run_key = hash_text(json.dumps(key_desc, sort_keys=True, default=str)).split(":")[-1][:16]
    staging = output_dir.parent / f".partial-{output_dir.name}-{run_key}"
    staging.mkdir(parents=True, exist_ok=True)
    outputs: list[dict[str, Any] | None] = [None] * len(partitions)
    todo = []
    for i, part in enumerate(partitions):
        name = f"part-{i:05d}.parquet"
        record = {"file": name, "source": str(part), "input_sha256": lineage["inputs"][i]["sha256"], "run_key": run_key}
        done = staging / f"part-{i:05d}.json"
        if done.is_file() and (staging / name).is_file():
            prior = json.loads(done.read_text(encoding="utf-8"))
            if prior.get("run_key") == run_key and prior.get("input_sha256") == record["input_sha256"]:
                outputs[i] = {**prior, "resumed": True}
                continue
        todo.append((i, part, record))
    resumed = len(partitions) - len(todo)
    if resumed:
        log.info("batch inference: %d of %d partitions already committed by an earlier try; skipping them",
                 resumed, len(partitions))
    if todo and not on_ray:
        model = _ModelActor(model_cls, model_kwargs)
        for i, part, record in todo:
            outputs[i] = {**model.write_partition(str(part.resolve()), str(staging / record["file"]),
                                                  config.batch_size, record), "resumed": False}
    elif todo:
        import ray

        actor_cls: Any = ray.remote(_ModelActor)
        actors = [actor_cls.options(num_cpus=config.cpus_per_actor, num_gpus=gpus, scheduling_strategy="SPREAD",
                                    max_restarts=3, max_task_retries=3).remote(model_cls, model_kwargs)
                  for _ in range(min(config.actors, len(todo)))]
        pending: dict[Any, int] = {}
        try:
            def collect(refs: list[Any]) -> None:
                for ref in refs:
                    outputs[pending.pop(ref)] = {**ray.get(ref), "resumed": False}

            for k, (i, part, record) in enumerate(todo):
                while len(pending) >= 2 * len(actors):
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    collect(ready)
                ref = actors[k % len(actors)].write_partition.remote(
                    str(part.resolve()), str(staging / record["file"]), config.batch_size, record)
                pending[ref] = i
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                collect(ready)
        finally:
            for actor in actors:
                ray.kill(actor)
    final = [o for o in outputs if o is not None]
    seconds = time.perf_counter() - started
    atomic_write_json(staging / "manifest.json", {
        **lineage, "engine": "ray" if on_ray else "local", "outputs": final, "rows": sum(o["rows"] for o in final),
        "seconds": seconds, "actors": config.actors if on_ray else 1, "gpus_per_actor": gpus, "run_key": run_key,
        "resumed_partitions": resumed,
        "nodes": sorted({o["node_id"] for o in final}),
    })
    # The manifest is in place: one rename publishes the whole output.
    os.rename(staging, output_dir)
    fsync_dir(output_dir.parent)
    return final, resumed


def _run_warm(
    partitions: list[Path], output_dir: Path, model_cls: type, model_kwargs: Mapping[str, Any],
    config: BatchConfig, gpus: float, total: int, keep_warm_s: float, started: float,
) -> tuple[list[dict[str, Any]], WarmActorsSummary, float]:
    """Ray Data reads the partitions and the warm pool's actors infer; the driver writes the rows
    in input order into a temporary directory, published whole with its manifest. Returns the
    outputs, the warm-actor summary and the seconds up to the manifest."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    # Order is what lets the driver write each partition's rows sequentially and 1:1.
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        # Reading is our own task over a list of paths (not Ray's file readers): their
        # ListFiles step reserves a whole CPU and starves behind actors on small hosts, and
        # the same reader as the plain loop gives the same column types.
        items = [{_PATH_COLUMN: str(p.resolve())} for p in partitions]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_task, batch_size=1, batch_format="pyarrow", num_cpus=config.read_cpus
        )
        with atomic_directory(output_dir) as tmp:
            writer = _PartitionWriter(tmp, partitions, total, config.log_every_s)
            pool = WarmPool(_ModelActor, model_cls, model_kwargs, n=config.actors, cpus=config.cpus_per_actor,
                            gpus=gpus, keep_warm_s=keep_warm_s, read_cpus=config.read_cpus)
            try:
                schema = _run_on_warm_actors(ds, pool.start(), writer, config.batch_size)
            finally:
                pool.close()
            warm: WarmActorsSummary = {"reused": pool.reused, "started": config.actors - pool.reused,
                                       "keep_warm_s": keep_warm_s}
            outputs = writer.finish(schema)
            seconds = time.perf_counter() - started
            atomic_write_json(tmp / "manifest.json", {
                **_lineage(partitions, model_cls, model_kwargs), "engine": "ray", "outputs": outputs,
                "rows": writer.done, "seconds": seconds, "actors": config.actors, "gpus_per_actor": gpus,
                "warm_actors": warm,
            })
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    return outputs, warm, seconds


def _run_on_warm_actors(ds: Any, pool: WarmPool, writer: _PartitionWriter, batch_size: int) -> pa.Schema | None:
    """Send Ray Data's batches round-robin to the warm actors, up to two in flight per actor,
    and write the results in input order. A batch whose actor died is resent once to a new one."""
    import ray

    inflight: deque[tuple[Any, int, int, dict[str, np.ndarray]]] = deque()
    schema = None

    def drain() -> pa.Schema:
        ref, slot, generation, batch = inflight.popleft()
        try:
            table = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            # Only the first failure seen for an actor replaces it; later ones reuse the new one.
            if pool.generation[slot] == generation:
                log.warning("batch inference: warm actor %s died (%s); resending to a new one", pool.name(slot), exc)
                pool.replace(slot)
            table = ray.get(pool.submit(slot, batch))
        _write_block(writer, table)
        return table.drop_columns([_PATH_COLUMN]).schema

    for k, batch in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)):
        slot = k % pool.n
        inflight.append((pool.submit(slot, batch), slot, pool.generation[slot], batch))
        while len(inflight) >= 2 * pool.n:
            schema = drain()
    while inflight:
        schema = drain()
    return schema


def _write_block(writer: _PartitionWriter, block: pa.Table) -> None:
    paths = block.column(_PATH_COLUMN).to_pylist()
    data = block.drop_columns([_PATH_COLUMN])
    start = 0
    # Blocks may straddle partitions; split them into runs of the same source path.
    for end in range(1, len(paths) + 1):
        if end == len(paths) or paths[end] != paths[start]:
            part = writer.index.get(paths[start])
            if part is None:
                raise InputError("Ray returned rows from an unknown partition", path=paths[start])
            writer.write(part, data.slice(start, end - start))
            start = end
