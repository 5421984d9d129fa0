"""``RayConfig(address=None)`` starts a Ray of the task's own, with another Ray user's cluster on the host.

The other cluster is a real ``ray start --head`` (its own port and temp folder, token auth). Its
temp folder is ``<base>/ray`` and the task runs with ``RAY_TMPDIR=<base>``, so the
``ray_current_cluster`` file that ``ray start`` wrote is the one plain ``ray.init()`` reads, as
``/tmp/ray/ray_current_cluster`` is on a host where someone ran ``ray start``. The task even
holds that cluster's token (the worst case: nothing but the address choice keeps it out). It
must start its own Ray: another GCS address and node, and no job (driver) on the other cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runners.conftest_ray import REPO, RayCluster

pytest.importorskip("ray")

# A task's process: a Ray session with the default config, then what it ran on.
_TASK = r"""
import json, os
import ray
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session

@ray.remote
def square(x):
    return x * x

with ray_session(RayConfig(num_cpus=1)) as info:
    ctx = ray.get_runtime_context()
    out = {"started": info["started"], "gcs": ctx.gcs_address, "node": ctx.get_node_id(),
           "square": ray.get(square.remote(7)), "ray_address_inside": os.environ.get("RAY_ADDRESS")}
out["ray_address_after"] = os.environ.get("RAY_ADDRESS")
print(json.dumps(out))
"""

# Reads the other cluster's nodes and jobs through a GCS client: registers no driver itself.
_INSPECT = r"""
import json, sys
from ray._raylet import GcsClient
gcs = GcsClient(address=sys.argv[1])
print(json.dumps({"nodes": sorted(n.hex() for n in gcs.get_all_node_info()),
                  "jobs": sorted(j.hex() for j in gcs.get_all_job_info())}))
"""


@pytest.fixture(scope="module")
def other() -> Iterator[tuple[RayCluster, Path]]:
    base = Path(tempfile.mkdtemp(prefix="oprs-", dir="/tmp"))
    cluster = RayCluster(num_nodes=1, cpus_per_node=1, temp_dir=str(base / "ray"))
    try:
        cluster.start()
        assert (base / "ray" / "ray_current_cluster").is_file()  # what plain ray.init() would join
        yield cluster, base
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _inspect(cluster: RayCluster) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _INSPECT, cluster.address], env=cluster.env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_task(base: Path, cluster: RayCluster, **extra: str) -> tuple[dict[str, Any], str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", RAY_TMPDIR=str(base), RAY_AUTH_TOKEN=cluster.token, **extra)
    proc = subprocess.run([sys.executable, "-c", _TASK], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, f"the task's Ray session failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_own_ray(result: dict[str, Any], cluster: RayCluster, before: dict[str, list[str]]) -> None:
    assert result["started"] is True and result["square"] == 49
    port = cluster.address.rpartition(":")[2]
    assert not result["gcs"].endswith(f":{port}"), result  # another GCS than the other cluster's
    after = _inspect(cluster)
    assert result["node"] not in after["nodes"]
    assert after == before  # no node joined, no job (driver) registered on the other cluster


@pytest.mark.timeout(300)
def test_a_task_does_not_join_the_cluster_in_the_hosts_current_cluster_file(other) -> None:
    cluster, base = other
    before = _inspect(cluster)
    result, _ = _run_task(base, cluster)
    _assert_own_ray(result, cluster, before)


@pytest.mark.timeout(300)
def test_a_task_does_not_join_the_cluster_named_by_ray_address(other) -> None:
    cluster, base = other
    before = _inspect(cluster)
    result, stderr = _run_task(base, cluster, RAY_ADDRESS=cluster.address)
    _assert_own_ray(result, cluster, before)
    # Hidden from the session (and the Ray it starts), given back after it, and said so.
    assert result["ray_address_inside"] is None and result["ray_address_after"] == cluster.address
    assert f"ignoring RAY_ADDRESS={cluster.address}" in stderr
