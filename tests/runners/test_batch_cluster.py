"""Batch inference on an existing two-node Ray cluster started with ``ray start`` and token auth.

The cluster (head + one more node, 1 CPU each, loopback) is started once for the module and
stopped in the fixture finalizer; see ``conftest_ray.RayCluster``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.json as pajson
import pytest

from airflow_outpost.runners.batch.example_models import PrototypeClassifier
from airflow_outpost.runners.batch.inference import BatchConfig, run_batch_inference
from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.errors import RayAuthError
from tests.runners.conftest_ray import RayCluster, classifier_kwargs, make_corpus
from tests.runners.test_batch import FailingModel, assert_same_rows, read_output

pytestmark = pytest.mark.slow




def test_existing_cluster_output_equals_in_process(cluster: RayCluster, tmp_path: Path, no_ray_auth_env) -> None:
    files = make_corpus(tmp_path / "in", partitions=3, rows=16, fmt="jsonl", seed=3)
    model = PrototypeClassifier(**classifier_kwargs())
    want: dict = {"id": [], "label": [], "score": []}
    for f in files:
        t = pajson.read_json(f)
        res = model({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names})
        for k in want:
            want[k].extend(res[k].tolist())
    import numpy as np

    want = {k: np.asarray(v) for k, v in want.items()}
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token + "\n")
    summary = run_batch_inference(
        tmp_path / "in", tmp_path / "out", PrototypeClassifier, classifier_kwargs(threads=1),
        # 0.75 CPU per actor on 1-CPU nodes puts one actor on each node, next to a read task.
        config=BatchConfig(batch_size=8, actors=2, cpus_per_actor=0.75),
        ray_config=RayConfig(address=cluster.address, auth_token_path=str(token_file)),
    )
    assert summary["ray_address"] == cluster.address and summary["rows"] == 48
    assert_same_rows(read_output(tmp_path / "out", 3), want)


@pytest.mark.timeout(120)
def test_wrong_token_is_a_clear_error(cluster: RayCluster, tmp_path: Path, no_ray_auth_env) -> None:
    import ray

    make_corpus(tmp_path / "in", partitions=1, rows=2)
    with pytest.raises(RayAuthError, match="auth token") as err:
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address=cluster.address, auth_token="not-the-token"))
    assert cluster.address in str(err.value) and err.value.retryable is False
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_missing_token_is_a_clear_error(cluster: RayCluster, tmp_path: Path, no_ray_auth_env) -> None:
    make_corpus(tmp_path / "in", partitions=1, rows=2)
    with pytest.raises(RayAuthError, match="no token is configured"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address=cluster.address))


@pytest.mark.timeout(120)
def test_joining_without_auth_mode_is_refused_by_the_cluster(cluster: RayCluster, tmp_path: Path, no_ray_auth_env) -> None:
    # A driver that does not send a token (auth disabled on its side) must not get in.
    make_corpus(tmp_path / "in", partitions=1, rows=2)
    with pytest.raises(RayAuthError, match="refused this driver"):
        run_batch_inference(tmp_path / "in", tmp_path / "out", FailingModel, {"fail_on": -1},
                            ray_config=RayConfig(address=cluster.address, auth_mode="disabled"))


_DRIVER = """
import json, sys
from airflow_outpost.runners.batch.inference import BatchConfig, run_batch_inference
from airflow_outpost.runners.batch.example_models import PrototypeClassifier
from airflow_outpost.runners.batch.ray_session import RayConfig
from tests.runners.conftest_ray import classifier_kwargs
summary = run_batch_inference(sys.argv[1], sys.argv[2], PrototypeClassifier, classifier_kwargs(threads=1),
                              config=BatchConfig(batch_size=8, actors=1, cpus_per_actor=0.75),
                              ray_config=RayConfig.from_env())
print(json.dumps(summary))
"""


@pytest.mark.timeout(300)
def test_warm_model_actors_outlive_the_task_process_that_started_them(
        cluster: RayCluster, tmp_path: Path, no_ray_auth_env) -> None:
    # Two separate driver processes, as two tasks on a worker with --ray are: the second finds
    # the model the first loaded, and both write the same rows.
    import json
    import os
    import subprocess
    import sys

    from tests.runners.conftest_ray import REPO

    make_corpus(tmp_path / "in", partitions=2, rows=8, fmt="jsonl", seed=5)
    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    env = {**os.environ, "OUTPOST_RAY_ADDRESS": cluster.address, "RAY_AUTH_TOKEN_PATH": str(token_file),
           "OUTPOST_RAY_KEEP_WARM_S": "120", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    runs = []
    try:
        for name in ("first", "second"):
            proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "in"), str(tmp_path / name)],
                                  env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        # The cluster is shared by the module: give back the CPU the warm actor holds.
        from airflow_outpost.runners.batch.ray_session import ray_session
        from airflow_outpost.runners.batch.warm_actors import release_idle

        with ray_session(RayConfig(address=cluster.address, auth_token_path=str(token_file))):
            release_idle(need_cpus=float("inf"))
    assert runs[0]["warm_actors"] == {"reused": 0, "started": 1, "keep_warm_s": 120.0}
    assert runs[1]["warm_actors"] == {"reused": 1, "started": 0, "keep_warm_s": 120.0}
    first, second = read_output(tmp_path / "first", 2), read_output(tmp_path / "second", 2)
    assert_same_rows(second, first)
