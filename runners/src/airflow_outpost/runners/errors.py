"""Errors raised by the runners.

One root, ``RunnerError``; every subclass says through ``retryable`` whether running the same
task again, unchanged, can succeed. Bad input and bad configuration never can: the task should
fail and be reported, not retried. Every class here is exported from ``airflow_outpost.runners``;
the modules that raise them also re-export them (``airflow_outpost.runners.index.versions.IndexStateError``
is this module's class).

    RunnerError                         (retryable = False)
    +-- StoreError                      store root missing/unusable, bad kind or name
    |   +-- ManifestError               a manifest exists but cannot be read, has a bad schema, or names
    |   |                               a file whose sha256 differs from the one it records
    |   +-- StoreBusyError              (retryable) another writer holds the name's lock; names the holder
    |   +-- LeaseLostError              (retryable) this writer's lease expired and was taken over
    +-- InputError                      the input data is wrong; names the file and row
    |   +-- MissingFieldError           a row lacks ``id`` or ``text`` (or it has the wrong type)
    |   +-- EmptyCorpusError            no documents at all
    |   +-- EncodingError               bytes that are not UTF-8
    |   +-- DuplicateIdError            two rows with the same ``id``
    +-- ModelError                      the model cannot be used
    |   +-- ModelNotFoundError          the model path does not exist / is not a model directory
    |   +-- ModelServiceError           (retryable) the model service cannot be started/reached, or broke the protocol
    |   +-- GpuMemoryError              (retryable) loading would oversubscribe GPU memory
    +-- DimensionMismatchError          new vectors do not match the dimension of existing shards
    +-- BackendUnavailableError         a requested device/backend is not present on this host
    |   +-- QualityGateError            the int8 build of a model misses the quality floor
    +-- IndexStateError                 the index directory cannot do what was asked (no version, gate failed)
    +-- RayConnectError                 (retryable) the Ray cluster could not be reached
    +-- ComputeLostError                (retryable) a Ray node or worker died mid-run; committed work is kept
    +-- RayAuthError                    the Ray cluster needs a token that is missing, unreadable or wrong
    +-- SettingError                    a setting or argument has a value that is not allowed (names both)

Nothing in this module imports ``worker``; the worker package has its own root exception.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ComputeLostError",
    "DimensionMismatchError",
    "DuplicateIdError",
    "EmptyCorpusError",
    "EncodingError",
    "GpuMemoryError",
    "IndexStateError",
    "InputError",
    "LeaseLostError",
    "ManifestError",
    "MissingFieldError",
    "ModelError",
    "ModelNotFoundError",
    "ModelServiceError",
    "QualityGateError",
    "RayAuthError",
    "RayConnectError",
    "RunnerError",
    "SettingError",
    "StoreBusyError",
    "StoreError",
]


class RunnerError(Exception):
    """Root of every error raised by ``runners``. ``retryable`` is False unless a subclass says otherwise."""

    retryable: bool = False


class StoreError(RunnerError):
    """The store root or a store path cannot be used."""


class ManifestError(StoreError):
    """A manifest is present but unreadable or malformed."""


class StoreBusyError(StoreError):
    """Another writer holds ``kind/name`` and did not let go within the lock timeout. Retryable.

    ``path`` is the locked directory; ``host``, ``pid`` and ``since`` (ISO time) name the holder
    as its lease file records it (None where unknown).
    """

    retryable = True

    def __init__(
        self, message: str, *, path: str, host: str | None = None, pid: int | None = None, since: str | None = None
    ) -> None:
        super().__init__(message)
        self.path, self.host, self.pid, self.since = path, host, pid, since


class LeaseLostError(StoreError):
    """This writer's lease expired and another writer took the name over; nothing was published. Retryable."""

    retryable = True


class InputError(RunnerError):
    """Input data is invalid. ``path`` and ``row`` (1-based line/row number, if known) say where."""

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}" + (f", row {row}" if row is not None else "")
            message = f"{where}: {message}"
        super().__init__(message)
        self.path = path
        self.row = row


class MissingFieldError(InputError):
    """A row lacks a required field (``id``/``text``) or it has the wrong type."""


class EmptyCorpusError(InputError):
    """The corpus holds no documents."""


class EncodingError(InputError):
    """The input contains bytes that are not valid UTF-8."""


class DuplicateIdError(InputError):
    """Two rows share the same document id."""


class ModelError(RunnerError):
    """The embedding model cannot be loaded or used."""


class ModelNotFoundError(ModelError):
    """The model path does not exist or is not a sentence-transformers model directory."""


class ModelServiceError(ModelError):
    """The model service could not be started or reached, or broke the protocol. Retryable."""

    retryable = True


class GpuMemoryError(ModelError):
    """Loading the model would oversubscribe GPU memory. Retryable: other models may be released."""

    retryable = True


class DimensionMismatchError(RunnerError):
    """Vectors would be appended to shards of a different dimension."""


class BackendUnavailableError(RunnerError):
    """A requested device or inference backend is not available on this host."""


class QualityGateError(BackendUnavailableError):
    """The int8 build of this model misses the quality floor; use an fp32 backend instead."""


class IndexStateError(RunnerError):
    """The index directory cannot do what was asked (no such version, nothing to roll back to, gate failed)."""


class RayConnectError(RunnerError):
    """The Ray cluster could not be reached; may succeed on retry (cluster restarting, network)."""

    retryable = True


class ComputeLostError(RunnerError):
    """A Ray node, worker or actor died mid-run and Ray gave up; what was committed is kept."""

    retryable = True


class RayAuthError(RunnerError):
    """The cluster needs a token that is missing, unreadable or wrong; retrying will not help."""


class SettingError(RunnerError):
    """A setting or argument has a value that is not allowed; the message names both.

    Raised for bad ``airflow_outpost.runners.bench.run`` settings, and by ``update_index`` when its
    arguments look swapped (0.1 took ``update_index(index_dir, embeddings_dir)``).
    """
