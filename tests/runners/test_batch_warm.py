"""Warm model actors for batch inference: reuse across runs, idle expiry, eviction, deaths, errors.

Real Ray (num_cpus=2). Most tests use cheap models defined here so that only the behaviour
of the actors is timed; one uses the real sentence-transformers classifier for row equality.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from airflow_outpost.runners.batch.example_models import PrototypeClassifier
from airflow_outpost.runners.batch.inference import BatchConfig, run_batch_inference
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session
from airflow_outpost.runners.batch.warm_actors import list_warm
from airflow_outpost.runners.errors import ModelNotFoundError
from tests.runners.conftest_ray import classifier_kwargs, make_corpus
from tests.runners.test_batch import assert_same_rows, in_process, read_output


class LengthModel:
    """Cheap deterministic model: the text length per row, and the pid that computed it."""

    def __init__(self, tag: str = "a") -> None:
        self.tag = tag

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"id": batch["id"], "n": np.array([len(t) for t in batch["text"]]),
                "pid": np.full(n, os.getpid()), "tag": np.array([self.tag] * n)}


class DiesOnceModel(LengthModel):
    """Kills its own process the first time it sees row ``die_on`` (a marker file makes it once)."""

    def __init__(self, die_on: int, marker: str) -> None:
        super().__init__()
        self.die_on, self.marker = die_on, marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.die_on in batch["id"].tolist() and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return super().__call__(batch)


@pytest.fixture
def ray_2cpu():
    with ray_session(RayConfig(num_cpus=2)) as session:
        yield session


def warm(n: int = 2, keep: float = 30.0, **kw) -> BatchConfig:
    return BatchConfig(batch_size=4, actors=n, cpus_per_actor=0.75, keep_warm_s=keep, **kw)


def pids(out: Path, parts: int) -> set[int]:
    return {p for i in range(parts) for p in pq.read_table(out / f"part-{i:05d}.parquet").column("pid").to_pylist()}


def test_second_run_reuses_the_loaded_model_and_writes_the_same_rows(tmp_path: Path, ray_2cpu) -> None:
    files = make_corpus(tmp_path / "in", partitions=3, rows=12)
    want = in_process(files)
    kwargs = classifier_kwargs(threads=1)
    first = run_batch_inference(tmp_path / "in", tmp_path / "a", PrototypeClassifier, kwargs, config=warm(keep=60))
    second = run_batch_inference(tmp_path / "in", tmp_path / "b", PrototypeClassifier, kwargs, config=warm(keep=60))
    assert first["warm_actors"] == {"reused": 0, "started": 2, "keep_warm_s": 60}
    assert second["warm_actors"] == {"reused": 2, "started": 0, "keep_warm_s": 60}
    assert_same_rows(read_output(tmp_path / "a", 3), want)
    assert_same_rows(read_output(tmp_path / "b", 3), want)
    # Both actors served batches: the work was spread, not funnelled through one.
    assert all(w["status"]["calls"] > 0 for w in list_warm())


def test_idle_actors_expire_and_a_later_run_starts_new_ones(tmp_path: Path, ray_2cpu) -> None:
    make_corpus(tmp_path / "in", partitions=2, rows=8)
    run_batch_inference(tmp_path / "in", tmp_path / "a", LengthModel, {}, config=warm(keep=1.0))
    before = pids(tmp_path / "a", 2)
    deadline = time.monotonic() + 20
    while list_warm() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert list_warm() == []
    again = run_batch_inference(tmp_path / "in", tmp_path / "b", LengthModel, {}, config=warm(keep=1.0))
    assert again["warm_actors"]["started"] == 2
    assert pids(tmp_path / "b", 2).isdisjoint(before)


def test_idle_actors_of_another_model_make_room(tmp_path: Path, ray_2cpu) -> None:
    make_corpus(tmp_path / "in", partitions=2, rows=8)
    run_batch_inference(tmp_path / "in", tmp_path / "a", LengthModel, {"tag": "a"}, config=warm(keep=300))
    time.sleep(1.2)  # idle long enough to count as idle
    # 2 x 0.75 CPUs are held by model "a"; model "b" needs the same plus the read share of 2 CPUs.
    out = run_batch_inference(tmp_path / "in", tmp_path / "b", LengthModel, {"tag": "b"}, config=warm(keep=300))
    assert out["warm_actors"]["started"] == 2
    assert pq.read_table(tmp_path / "b" / "part-00000.parquet").column("tag").to_pylist() == ["b"] * 8
    names = [w["name"] for w in list_warm()]
    assert len(names) == 2 and len({n.rsplit("-", 1)[0] for n in names}) == 1


def test_an_actor_dying_mid_run_is_replaced_and_no_row_is_lost(tmp_path: Path, ray_2cpu) -> None:
    make_corpus(tmp_path / "in", partitions=3, rows=8)
    marker = tmp_path / "died"
    out = run_batch_inference(tmp_path / "in", tmp_path / "out", DiesOnceModel,
                              {"die_on": 13, "marker": str(marker)}, config=warm(keep=30))
    assert marker.exists()
    assert out["rows"] == 24
    ids = [i for p in range(3) for i in pq.read_table(tmp_path / "out" / f"part-{p:05d}.parquet").column("id").to_pylist()]
    assert ids == list(range(24))


def test_a_model_that_fails_to_load_is_its_own_error_and_writes_nothing(tmp_path: Path, ray_2cpu) -> None:
    make_corpus(tmp_path / "in", partitions=1, rows=4)
    with pytest.raises(ModelNotFoundError, match="not a sentence-transformers model directory"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", PrototypeClassifier,
                            {**classifier_kwargs(), "model_path": str(tmp_path / "nope")}, config=warm())
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 10  # names are freed asynchronously after the kill
    while list_warm() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list_warm() == []


def test_keep_warm_comes_from_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_RAY_KEEP_WARM_S", "120")
    assert BatchConfig().warm_seconds() == 120.0
    assert BatchConfig(keep_warm_s=0).warm_seconds() == 0.0
    monkeypatch.setenv("OUTPOST_RAY_KEEP_WARM_S", "soon")
    with pytest.raises(ValueError, match="OUTPOST_RAY_KEEP_WARM_S='soon'"):
        BatchConfig().warm_seconds()
    monkeypatch.delenv("OUTPOST_RAY_KEEP_WARM_S")
    assert BatchConfig().warm_seconds() == 0.0
    with pytest.raises(ValueError, match="keep_warm_s=-1"):
        BatchConfig(keep_warm_s=-1)


def test_actors_that_cannot_be_placed_time_out_clearly_and_leave_nothing(ray_2cpu) -> None:
    from airflow_outpost.runners.batch.inference import _ModelActor
    from airflow_outpost.runners.batch.warm_actors import WarmPool

    # 3 CPUs per actor on a 2-CPU Ray can never be placed: a bounded wait, then a clear error.
    pool = WarmPool(_ModelActor, LengthModel, {}, n=1, cpus=3, gpus=0, keep_warm_s=30, start_timeout_s=2)
    with pytest.raises(TimeoutError, match=r"1 warm model actor\(s\) did not start within 2s.*3 CPU"):
        pool.start()
    deadline = time.monotonic() + 10
    while list_warm() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list_warm() == []
