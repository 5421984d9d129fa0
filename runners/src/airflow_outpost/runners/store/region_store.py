"""Region-local store: one root folder for corpora, embeddings, indexes, results and model artifacts.

Layout (``<kind>/<name>/`` per dataset, one ``manifest.json`` each)::

    <root>/
      corpora/<name>/...            input documents copied or produced in-region
      embeddings/<name>/...         vector shards (.npy) + ids, written by airflow_outpost.runners.embeddings.corpus
      indexes/<name>/...            FAISS indexes
      results/<name>/...            anything a task publishes for later tasks
      models/<name>/...             derived model artifacts (e.g. optimized ONNX graphs)

The root comes from the ``root`` argument or, if that is None, the ``OUTPOST_STORE_ROOT``
environment variable (the worker sets it for each task process).

API::

    store = Store(root=None)                      # StoreError if no root is given or set
    store.path(kind, name, *parts) -> Path        # <root>/<kind>/<name>/<parts...>; validates names
    store.read_manifest(kind, name) -> dict | None
    store.write_manifest(kind, name, body, *, inputs=(), model=None) -> dict
    store.list(kind) -> list[str]                 # names that have a manifest
    store.uri(path) -> "file:///..."              # local URI for XCom summaries
    store.sweep_temporaries(kind, name) -> int    # removes leftovers of crashed writes (owner gone)
    store.writer_lock(kind, name) -> context      # the one-writer-per-name lock (store.writer_lock)

    hash_bytes(b) / hash_text(s) / hash_file(p) / hash_tree(dir) -> "sha256:<hex>"
    verify_file(p, sha256, what) -> None          # ManifestError if the content's hash differs
    input_record(path) -> {"path", "sha256", "bytes"}
    model_record(path, name=None, revision=None) -> {"name", "path", "revision", "weights_sha256"}
    code_version() -> "0.3.0"                     # airflow-outpost-runners version that wrote the output

Every manifest carries lineage: ``inputs`` (path + content hash), ``model`` (name + revision +
weights hash), ``code_version`` and ``written_at``, plus whatever the writer puts in ``body``.

Atomicity: the manifest is the commit point. Writers publish data files first, under names
that an older manifest never references (versioned names), then replace ``manifest.json``
atomically (``airflow_outpost.runners.store.atomic``). A crash at any point leaves the previous manifest, and every
file it references, readable; leftovers are ``.tmp-*`` files or unreferenced versioned files.

Writers: one per name at a time. ``embed_corpus``, ``build_index``, ``update_index``, ``promote``
and ``rollback`` allocate a version and publish it holding ``writer_lock(kind, name)`` (an fcntl
lock where the mount honours it, and always a renewed lease file; see
``airflow_outpost.runners.store.writer_lock``). Readers take no lock: they check the sha256 that
the manifest records for each file they read (``verify_file``), so a file that does not belong to
the manifest's version raises ManifestError instead of returning wrong data.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow_outpost.runners.errors import ManifestError, StoreError
from airflow_outpost.runners.store.atomic import atomic_write_json, sweep_orphans
from airflow_outpost.runners.store.writer_lock import LockSettings, WriterLease, writer_lock

ENV_ROOT = "OUTPOST_STORE_ROOT"
KINDS = ("corpora", "embeddings", "indexes", "results", "models")
MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
PACKAGE_NAME = "airflow-outpost-runners"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    """Return ``"sha256:<hex>"`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_text(text: str) -> str:
    """Return ``"sha256:<hex>"`` of the UTF-8 encoding of ``text``."""
    return hash_bytes(text.encode("utf-8"))


def hash_file(path: str | os.PathLike[str]) -> str:
    """Return ``"sha256:<hex>"`` of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


_verified_lock = threading.Lock()
_verified: dict[tuple[str, int, int, int, int], str] = {}


def verify_file(path: str | os.PathLike[str], expected: str | None, what: str) -> None:
    """Raise ManifestError unless ``path``'s content hashes to ``expected`` (skipped if None).

    How readers tell a file of the manifest's version from one another writer put under the same
    name. A file already verified with the same inode, size and mtime is not hashed again in this
    process, so repeated reads of a large shard stay cheap.
    """
    if expected is None:
        return
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: {what} named by the manifest is missing") from exc
    key = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _verified_lock:
        known = _verified.get(key)
    actual = known or hash_file(p)
    if actual != expected:
        raise ManifestError(
            f"{p}: {what} has {actual} but the manifest records {expected}: it belongs to another "
            "version (a concurrent or interrupted writer); refusing to read it"
        )
    with _verified_lock:
        if len(_verified) > 4096:
            _verified.clear()
        _verified[key] = actual


def hash_tree(path: str | os.PathLike[str]) -> str:
    """Return one ``"sha256:<hex>"`` over every regular file below ``path`` (names and contents).

    Hidden files and ``.tmp-*`` leftovers are skipped, so the hash of a model directory changes
    only when its weights, tokenizer or configuration change.
    """
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        h.update(hash_file(file).encode() + b"\0")
    return "sha256:" + h.hexdigest()


def code_version() -> str:
    """Version of airflow-outpost-runners that is running (installed metadata, else the source pyproject)."""
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        pass
    # runners/src/airflow_outpost/runners/store/ -> runners/pyproject.toml in a checkout
    pyproject = Path(__file__).resolve().parents[4] / "pyproject.toml"
    try:
        # A source checkout (tests, `python -m`) has no metadata; read the version it declares.
        match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"))
    except OSError:
        match = None
    if match is None:
        # A vendored copy without metadata still writes manifests; lineage then says so.
        return "0+unknown"
    return match.group(1)


def input_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Lineage entry for an input file: absolute path, content hash and size."""
    p = Path(path).resolve()
    return {"path": str(p), "sha256": hash_file(p), "bytes": p.stat().st_size}


def model_record(
    path: str | os.PathLike[str], name: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """Lineage entry for a model directory: name, path, revision (if known) and a weights hash.

    The weights hash covers every file of the directory (``hash_tree``), so it identifies the
    model even when no revision is recorded.
    """
    p = Path(path).resolve()
    return {
        "name": name or p.name,
        "path": str(p),
        "revision": revision,
        "weights_sha256": hash_tree(p),
    }


class Store:
    """A region-local store rooted at one folder. Cheap to construct; holds no open resources."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, create: bool = True) -> None:
        if root is None:
            root = os.environ.get(ENV_ROOT)
        if not root:
            raise StoreError(f"no store root: pass root= or set {ENV_ROOT}")
        self.root = Path(root).expanduser().resolve()
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store root {self.root}: {exc}") from exc
        elif not self.root.is_dir():
            raise StoreError(f"store root {self.root} does not exist")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, kind: str, name: str, *parts: str) -> Path:
        """Return ``<root>/<kind>/<name>/<parts...>`` (not created). Rejects unknown kinds and unsafe names."""
        if kind not in KINDS:
            raise StoreError(f"unknown store kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not _NAME_RE.match(name):
            raise StoreError(
                f"invalid {kind} name {name!r}: use letters, digits, '.', '_', '=', '-' (max 200)"
            )
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\\" in part:
                raise StoreError(f"invalid path part {part!r} under {kind}/{name}")
        return self.root.joinpath(kind, name, *parts)

    def manifest_path(self, kind: str, name: str) -> Path:
        """Path of the manifest of ``kind/name``."""
        return self.path(kind, name, MANIFEST_NAME)

    def read_manifest(self, kind: str, name: str) -> dict[str, Any] | None:
        """Return the current manifest of ``kind/name``, or None if none was ever committed.

        Raises ManifestError if the file exists but is not a JSON object (never happens through
        ``write_manifest``, which replaces it atomically).
        """
        path = self.manifest_path(kind, name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or "schema" not in obj:
            raise ManifestError(f"{path}: not an outpost manifest (no 'schema' field)")
        if obj["schema"] > SCHEMA_VERSION:
            raise ManifestError(
                f"{path}: schema {obj['schema']} is newer than this code understands ({SCHEMA_VERSION})"
            )
        return obj

    def write_manifest(
        self,
        kind: str,
        name: str,
        body: Mapping[str, Any],
        *,
        inputs: Iterable[Mapping[str, Any]] = (),
        model: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Atomically replace the manifest of ``kind/name`` and return what was written.

        Adds the lineage fields (``schema``, ``kind``, ``name``, ``inputs``, ``model``,
        ``code_version``, ``written_at``) to ``body``. Call it last, after every file the
        manifest references is in place: it is the commit point. Safe to retry.
        """
        manifest: dict[str, Any] = dict(body)
        manifest.update(
            schema=SCHEMA_VERSION,
            kind=kind,
            name=name,
            inputs=[dict(i) for i in inputs],
            model=dict(model) if model is not None else None,
            code_version=code_version(),
            written_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        atomic_write_json(self.manifest_path(kind, name), manifest)
        return manifest

    def list(self, kind: str) -> list[str]:
        """Names under ``kind`` that have a committed manifest, sorted."""
        base = self.root / kind
        if kind not in KINDS:
            raise StoreError(f"unknown store kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / MANIFEST_NAME).is_file())

    def uri(self, path: str | os.PathLike[str]) -> str:
        """Local ``file://`` URI for a path in the store (what goes into XCom instead of data)."""
        return Path(path).resolve().as_uri()

    @contextmanager
    def writer_lock(self, kind: str, name: str, settings: LockSettings | None = None) -> Iterator[WriterLease]:
        """Hold the one-writer lock of ``kind/name`` (see ``airflow_outpost.runners.store.writer_lock``).

        Raises StoreBusyError (retryable) naming the holder after ``settings.timeout_s``.
        """
        with writer_lock(self.path(kind, name), settings) as lease:
            yield lease

    def sweep_temporaries(self, kind: str, name: str, settings: LockSettings | None = None) -> int:
        """Delete ``.tmp-*`` leftovers of writers that are gone under ``kind/name``; return how many.

        Takes the name's writer lock (waiting like a writer), so a temporary of a live writer is
        never removed: under the lock, only temporaries of dead processes on this host and of
        other hosts (whose leases have ended) go.
        """
        base = self.path(kind, name)
        if not base.is_dir():
            return 0
        with writer_lock(base, settings):
            return sweep_orphans(base, writer_lock_held=True)
