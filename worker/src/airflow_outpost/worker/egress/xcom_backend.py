"""Region-local XCom: large or data-typed XCom values stay in the region; only a reference leaves.

The worker sets ``AIRFLOW__CORE__XCOM_BACKEND=airflow_outpost.worker.egress.xcom_backend.RegionLocalXCom`` for its task
processes (with ``region_local_xcom`` on). :meth:`RegionLocalXCom.serialize_value` writes a value
to the region-local store when its serialized form exceeds ``OUTPOST_XCOM_THRESHOLD_BYTES``, or
when it is bytes, a numpy array, a data frame or a long list, and returns a reference::

    outpost://<region>/xcom/<dag>/<run>/<task>/<map>/<key>?size=<bytes>&sha256=<hex>&type=<json|bytes|npy>

which is all the control plane stores (the Airflow UI and REST API show it). A downstream task on
a worker of the same region resolves it from ``OUTPOST_STORE_ROOT`` (checking size and checksum);
a worker of another region raises :class:`RegionPinnedError` naming the region the value is
pinned to. Workers of one region on several hosts need ``store_root`` on shared storage.

Runs inside task processes: imports the Task SDK, never the worker runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import parse_qs, quote, unquote, urlsplit

from airflow.sdk.bases.xcom import BaseXCom

from airflow_outpost.worker.runtime.state import write_atomic

SCHEME = "outpost://"
LONG_LIST_ITEMS = 10_000
DEFAULT_THRESHOLD = 65_536


class RegionPinnedError(RuntimeError):
    """The XCom value lives in another region's store and may not be fetched from here."""


class MissingValueError(RuntimeError):
    """The referenced value is not in this region's store, or its checksum does not match."""


def _seg(value: Any) -> str:
    seg = quote(str(value), safe="")
    return seg.replace(".", "%2E") if seg in (".", "..", "") else seg


def _region() -> str:
    return os.environ.get("OUTPOST_REGION", "default")


def _store_root() -> Path:
    root = os.environ.get("OUTPOST_STORE_ROOT")
    if not root:
        raise MissingValueError("OUTPOST_STORE_ROOT is not set: region-local XCom needs the worker's store")
    return Path(root)


def _typed_payload(value: Any) -> tuple[str, bytes] | None:
    """Raw encodings for data types that always stay local: bytes and numpy arrays."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes", bytes(value)
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return "npy", buf.getvalue()
    return None


def _is_data_type(value: Any) -> bool:
    name = type(value).__name__
    return (name == "DataFrame" and type(value).__module__.split(".")[0] in ("pandas", "polars")) or (
        isinstance(value, (list, tuple)) and len(value) > LONG_LIST_ITEMS)


def make_reference(region: str, dag_id: str, run_id: str, task_id: str, map_index: int, key: str,
                   size: int, digest: str, kind: str) -> str:
    path = "/".join(_seg(x) for x in (dag_id, run_id, task_id, map_index, key))
    return f"{SCHEME}{region}/xcom/{path}?size={size}&sha256={digest}&type={kind}"


def parse_reference(ref: str) -> dict[str, Any]:
    """Split a reference into region, relative store path, size, sha256 and type."""
    parts = urlsplit(ref)
    segs = parts.path.lstrip("/").split("/")
    if parts.scheme != "outpost" or len(segs) != 6 or segs[0] != "xcom" or any(s in ("", ".", "..") for s in segs):
        raise ValueError(f"not an outpost XCom reference: {ref[:200]!r}")
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return {"region": parts.netloc, "path": "/".join(segs), "size": int(query["size"]),
            "sha256": query["sha256"], "type": query.get("type", "json"), "key": unquote(segs[5])}


def is_reference(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(SCHEME) and "sha256=" in value


class RegionLocalXCom(BaseXCom):
    """XCom backend that keeps big or data-typed values in the region (see module docstring)."""

    @staticmethod
    def serialize_value(value: Any, *, key: str | None = None, task_id: str | None = None, dag_id: str | None = None,
                        run_id: str | None = None, map_index: int | None = None) -> Any:
        typed = _typed_payload(value)
        if typed is None:
            serialized = BaseXCom.serialize_value(value)
            data = json.dumps(serialized, separators=(",", ":")).encode()
            threshold = int(os.environ.get("OUTPOST_XCOM_THRESHOLD_BYTES") or DEFAULT_THRESHOLD)
            if len(data) <= threshold and not _is_data_type(value):
                return serialized
            kind = "json"
        else:
            kind, data = typed
        if not (dag_id and run_id and task_id and key):
            raise ValueError("region-local XCom needs dag_id, run_id, task_id and key to place the value")
        digest = hashlib.sha256(data).hexdigest()
        ref = make_reference(_region(), dag_id, run_id, task_id, -1 if map_index is None else map_index, key,
                             len(data), digest, kind)
        write_atomic(_store_root() / _region() / parse_reference(ref)["path"], data)
        return ref

    @staticmethod
    def deserialize_value(result: Any) -> Any:
        value = result.value
        if not is_reference(value):
            return BaseXCom.deserialize_value(result)
        return load_reference(value)

    @classmethod
    def purge(cls, xcom: Any, *args: Any) -> None:
        value = getattr(xcom, "value", None)
        if is_reference(value):
            ref = parse_reference(value)
            if ref["region"] == _region():
                with contextlib.suppress(FileNotFoundError, MissingValueError):
                    (_store_root() / ref["region"] / ref["path"]).unlink()


def load_reference(value: str) -> Any:
    """Read the value behind a reference from this region's store, checking size and checksum."""
    ref = parse_reference(value)
    here = _region()
    if ref["region"] != here:
        raise RegionPinnedError(
            f"XCom {ref['key']!r} is pinned to region {ref['region']!r}: its data stays on workers of that region "
            f"and this worker is in region {here!r}. Run this task on a queue served by region {ref['region']!r}.")
    path = _store_root() / ref["region"] / ref["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingValueError(f"XCom {ref['key']!r} ({value[:200]}) is not in the region store at {path}") from None
    if len(data) != ref["size"] or hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise MissingValueError(f"XCom {ref['key']!r} at {path} does not match its reference (size or sha256)")
    if ref["type"] == "bytes":
        return data
    if ref["type"] == "npy":
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)
    try:
        from airflow.sdk.serde import deserialize
    except ImportError:  # Task SDK 1.1 (Airflow 3.1): serde lives in the core
        from airflow.serialization.serde import deserialize  # type: ignore[no-redef]

    return deserialize(json.loads(data))
