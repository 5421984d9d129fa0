"""The region-local XCom backend, in-process: what stays, what leaves, and region pinning."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from airflow_outpost.worker.egress.xcom_backend import MissingValueError, RegionLocalXCom, RegionPinnedError, parse_reference

IDS = {"key": "return_value", "dag_id": "d", "run_id": "manual__2024-01-01T00:00:00+00:00", "task_id": "t", "map_index": 2}


@pytest.fixture
def region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OUTPOST_REGION", "eu-1")
    monkeypatch.setenv("OUTPOST_STORE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("OUTPOST_XCOM_THRESHOLD_BYTES", "1024")
    return tmp_path / "store"


def _roundtrip(value):
    stored = RegionLocalXCom.serialize_value(value, **IDS)
    return stored, RegionLocalXCom.deserialize_value(SimpleNamespace(key="return_value", value=stored))


def test_small_values_go_to_the_control_plane_as_usual(region: Path) -> None:
    stored, back = _roundtrip({"rows": 3})
    assert stored == {"rows": 3} and back == {"rows": 3}
    assert not region.exists()


@pytest.mark.parametrize("value", [list(range(5000)), "x" * 2000, b"\x00raw bytes", list(range(10_001))[:10_001]])
def test_large_and_data_typed_values_stay_in_the_region(region: Path, value) -> None:
    stored, back = _roundtrip(value)
    assert isinstance(stored, str) and stored.startswith("outpost://eu-1/xcom/d/manual__2024-01-01T00%3A00%3A00%2B00%3A00/t/2/return_value?")
    assert back == value
    ref = parse_reference(stored)
    path = region / "eu-1" / ref["path"]
    assert path.stat().st_size == ref["size"]


def test_numpy_arrays_stay_local_whatever_their_size(region: Path) -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    stored, back = _roundtrip(arr)
    assert "type=npy" in stored
    assert isinstance(back, np.ndarray) and back.dtype == np.float32 and (back == arr).all()


def test_other_region_gets_a_clear_error(region: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored, _ = _roundtrip(list(range(5000)))
    monkeypatch.setenv("OUTPOST_REGION", "us-2")
    with pytest.raises(RegionPinnedError, match=r"pinned to region 'eu-1'.*this worker is in region 'us-2'"):
        RegionLocalXCom.deserialize_value(SimpleNamespace(key="return_value", value=stored))


def test_tampered_or_missing_value_is_refused(region: Path) -> None:
    stored, _ = _roundtrip(list(range(5000)))
    path = region / "eu-1" / parse_reference(stored)["path"]
    path.write_bytes(path.read_bytes().replace(b"1", b"7", 1))
    with pytest.raises(MissingValueError, match="does not match"):
        RegionLocalXCom.deserialize_value(SimpleNamespace(key="return_value", value=stored))
    RegionLocalXCom.purge(SimpleNamespace(value=stored))
    assert not path.exists()
    with pytest.raises(MissingValueError, match="not in the region store"):
        RegionLocalXCom.deserialize_value(SimpleNamespace(key="return_value", value=stored))


def test_path_components_cannot_escape_the_store(region: Path) -> None:
    stored = RegionLocalXCom.serialize_value("y" * 5000, key="..", dag_id="..", run_id="../../etc", task_id="/abs", map_index=-1)
    assert ".." not in parse_reference(stored)["path"].split("/")
    assert all(region in p.parents for p in region.rglob("*") if p.is_file())
    with pytest.raises(ValueError):
        parse_reference("outpost://eu-1/xcom/../../../etc/passwd?size=1&sha256=0")
