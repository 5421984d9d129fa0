"""Batch inference on a Ray started on demand, the plain-loop baseline, and their failure modes.

Real Ray (num_cpus=2), real sentence-transformers model, a few dozen generated rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from airflow_outpost.runners.batch.example_models import PrototypeClassifier
from airflow_outpost.runners.batch.inference import BatchConfig, list_partitions, run_batch_inference, run_plain_loop
from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.errors import InputError, RayAuthError, RayConnectError, SettingError
from tests.runners.conftest_ray import classifier_kwargs, free_port, make_corpus


def in_process(files: list[Path], **kwargs) -> dict[str, np.ndarray]:
    """Reference output: the model called directly on each whole partition, in order."""
    model = PrototypeClassifier(**classifier_kwargs(**kwargs))
    out: dict[str, list] = {"id": [], "label": [], "score": []}
    for f in files:
        t = pq.read_table(f)
        res = model({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names})
        for k in out:
            out[k].extend(res[k].tolist())
    return {k: np.asarray(v) for k, v in out.items()}


def read_output(out_dir: Path, n: int) -> dict[str, np.ndarray]:
    tables = [pq.read_table(out_dir / f"part-{i:05d}.parquet") for i in range(n)]
    return {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables]) for c in ("id", "label", "score")}


def assert_same_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got["id"].tolist() == want["id"].tolist()
    assert got["label"].tolist() == want["label"].tolist()
    # Batch boundaries differ (padding changes float summation order), so scores get a tolerance.
    np.testing.assert_allclose(got["score"], want["score"], rtol=0, atol=1e-4)


def test_ray_on_demand_equals_in_process_row_for_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    home_token = Path.home() / ".ray" / "auth_token"
    had_home_token = home_token.exists()
    files = make_corpus(tmp_path / "in", partitions=3, rows=24)
    want = in_process(files)
    assert len(set(want["label"].tolist())) == 3  # the example model really separates the topics

    summary = run_batch_inference(
        tmp_path / "in", tmp_path / "out", PrototypeClassifier, classifier_kwargs(threads=1),
        config=BatchConfig(batch_size=10, actors=2, cpus_per_actor=0.75), ray_config=RayConfig(num_cpus=2),
    )
    assert summary["rows"] == 72 and summary["partitions"] == 3 and summary["engine"] == "ray"
    assert_same_rows(read_output(tmp_path / "out", 3), want)
    # Partitions map 1:1 to output files.
    for i, f in enumerate(files):
        assert pq.read_table(tmp_path / "out" / f"part-{i:05d}.parquet").column("id").to_pylist() == \
            pq.read_table(f).column("id").to_pylist()

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(f.resolve()) for f in files]
    assert manifest["model"]["weights_sha256"].startswith("sha256:")
    assert manifest["model"]["class"] == "airflow_outpost.runners.batch.example_models.PrototypeClassifier"
    assert manifest["code_version"] and manifest["rows"] == 72

    # The session cleaned up after itself: Ray is down, auth variables are as before.
    assert not ray.is_initialized()
    assert "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_MODE" not in os.environ
    assert home_token.exists() == had_home_token  # the session token never lands in ~/.ray

    # The plain loop baseline writes the same rows.
    loop = run_plain_loop(tmp_path / "in", tmp_path / "loop", PrototypeClassifier, classifier_kwargs(), batch_size=10)
    assert loop["rows"] == 72
    assert_same_rows(read_output(tmp_path / "loop", 3), want)


class FailingModel:
    """Cheap model that fails on the row with id ``fail_on``; stands in for a crash mid-run."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fail_on in batch["id"].tolist():
            raise RuntimeError(f"boom on {self.fail_on}")
        return {"id": batch["id"], "n": np.array([len(t) for t in batch["text"]])}


def test_failure_leaves_no_output_under_the_final_name(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=2, rows=10, fmt="jsonl")
    with pytest.raises(RuntimeError, match="boom on 15"):
        run_plain_loop(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": 15}, batch_size=4)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # A retry after the fix succeeds into the same name.
    ok = run_plain_loop(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1}, batch_size=4)
    assert ok["rows"] == 20
    assert pq.read_table(tmp_path / "out" / "part-00001.parquet").column("id").to_pylist() == list(range(10, 20))
    with pytest.raises(FileExistsError):
        run_plain_loop(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1})


def test_failure_on_ray_leaves_no_output(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=2, rows=10, fmt="jsonl")
    with pytest.raises(Exception, match="boom on 15"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": 15},
                            config=BatchConfig(batch_size=4), ray_config=RayConfig(num_cpus=2))
    assert not (tmp_path / "out").exists()


def test_local_engine_equals_in_process_and_records_itself(tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "in", partitions=3, rows=24)
    summary = run_batch_inference(tmp_path / "in", tmp_path / "out", PrototypeClassifier, classifier_kwargs(threads=1),
                                  config=BatchConfig(batch_size=10), engine="local")
    assert (summary["engine"], summary["rows"], summary["resumed_partitions"], summary["ray_address"]) == \
        ("local", 72, 0, None)
    assert_same_rows(read_output(tmp_path / "out", 3), in_process(files))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["engine"] == "local" and manifest["rows"] == 72 and len(manifest["outputs"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]


class FlaggedFailure:
    """Fails on row ``fail_on`` while the file ``flag`` exists: the same model (same run key) succeeds on retry."""

    def __init__(self, fail_on: int, flag: str) -> None:
        self.fail_on, self.flag = fail_on, Path(flag)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.flag.exists() and self.fail_on in batch["id"].tolist():
            raise RuntimeError(f"boom on {self.fail_on}")
        return {"id": batch["id"], "n": np.array([len(t) for t in batch["text"]])}


def test_local_engine_keeps_committed_partitions_for_the_retry(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=3, rows=10, fmt="jsonl")
    flag = tmp_path / "flag"
    flag.touch()
    kwargs = {"fail_on": 25, "flag": str(flag)}  # row 25 is in the third partition
    with pytest.raises(RuntimeError, match="boom on 25"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FlaggedFailure, kwargs, config=BatchConfig(batch_size=4),
                            engine="local")
    assert not (tmp_path / "out").exists()
    flag.unlink()
    out = run_batch_inference(tmp_path / "in", tmp_path / "out", FlaggedFailure, kwargs, config=BatchConfig(batch_size=4),
                              engine="local")
    assert out["rows"] == 30 and out["resumed_partitions"] == 2  # only the failed partition was computed again
    assert pq.read_table(tmp_path / "out" / "part-00002.parquet").column("id").to_pylist() == list(range(20, 30))


def test_engine_and_warm_actor_settings_are_checked(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=1, rows=4, fmt="jsonl")
    with pytest.raises(SettingError, match="engine='spark' is invalid"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1}, engine="spark")
    with pytest.raises(SettingError, match="keep_warm_s .* needs engine='ray'"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            config=BatchConfig(keep_warm_s=60), engine="local")
    assert not (tmp_path / "out").exists()


def test_missing_token_for_a_cluster_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    make_corpus(tmp_path / "in", partitions=1, rows=2)
    with pytest.raises(RayAuthError, match="no token is configured") as err:
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address="127.0.0.1:6379"))
    assert err.value.retryable is False
    with pytest.raises(RayAuthError, match="cannot read the Ray auth token file"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address="127.0.0.1:6379", auth_token_path=str(tmp_path / "nope")))
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_unreachable_cluster_is_a_retryable_error(tmp_path: Path) -> None:
    make_corpus(tmp_path / "in", partitions=1, rows=2)
    port = free_port()  # nothing listens there
    with pytest.raises(RayConnectError, match=f"127.0.0.1:{port}") as err:
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address=f"127.0.0.1:{port}", auth_token="x", connect_timeout_s=2))
    assert err.value.retryable is True


def test_partition_listing_rejects_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet or .jsonl"):
        list_partitions(tmp_path / "empty")
    make_corpus(tmp_path / "mixed", partitions=1, rows=2, fmt="parquet")
    make_corpus(tmp_path / "mixed", partitions=2, rows=2, fmt="jsonl")
    with pytest.raises(InputError, match="must all be .parquet or all .jsonl"):
        list_partitions(tmp_path / "mixed")
    with pytest.raises(ValueError, match="RayConfig.address='localhost'"):
        RayConfig(address="localhost")
    with pytest.raises(ValueError, match="BatchConfig.actors=0"):
        BatchConfig(actors=0)


def test_model_that_drops_rows_is_rejected(tmp_path: Path) -> None:
    class Dropper:
        def __call__(self, batch):
            return {"id": batch["id"][:1]}

    make_corpus(tmp_path / "in", partitions=1, rows=5)
    with pytest.raises(InputError, match="returned 1 rows for 5"):
        run_plain_loop(tmp_path / "in", tmp_path / "out", Dropper, batch_size=5)
    assert not (tmp_path / "out").exists()
