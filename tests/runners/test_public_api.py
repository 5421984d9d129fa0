"""The DAG-author API of ``airflow_outpost.runners``: real imports, cheap to import, typed results, one error root."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import airflow_outpost.runners as runners
from airflow_outpost.runners import errors, results

# What a DAG file must not pay for at parse time; the calls that need them import them.
HEAVY = ("faiss", "torch", "ray", "sentence_transformers", "pyarrow", "onnxruntime", "ctranslate2", "numpy")


def test_import_is_cheap_and_every_exported_name_resolves() -> None:
    # A fresh interpreter: this test process has long since imported numpy, FAISS and the rest.
    script = (
        "import json, sys\n"
        "import airflow_outpost.runners as r\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "missing = [n for n in r.__all__ if not hasattr(r, n)]\n"
        "print(json.dumps({'heavy': heavy, 'missing': missing, 'all': list(r.__all__)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["heavy"] == [], f"importing airflow_outpost.runners imported {out['heavy']}"
    assert out["missing"] == []
    assert len(out["all"]) == len(set(out["all"])) and set(out["all"]) == set(runners.__all__)


def test_names_are_real_attributes_and_internals_stay_in_their_submodules() -> None:
    # Real imports (what type checkers see), not a module __getattr__.
    assert not hasattr(runners, "__getattr__")
    for name in runners.__all__:
        assert name in vars(runners), name
    for internal in ("ModelService", "hash_bytes", "hash_text", "hash_file", "hash_tree", "input_record",
                     "model_record", "code_version", "chunk_key"):
        assert internal not in runners.__all__ and not hasattr(runners, internal), internal
    from airflow_outpost.runners.embeddings.corpus import chunk_key
    from airflow_outpost.runners.model_service.service import ModelService
    from airflow_outpost.runners.store.region_store import hash_file

    assert callable(chunk_key) and callable(hash_file) and isinstance(ModelService, type)


def test_every_result_type_is_exported_and_typed() -> None:
    for name in results.__all__:
        assert getattr(runners, name) is getattr(results, name), name
    assert typing.get_type_hints(runners.build_index)["return"] is results.IndexSummary
    assert typing.get_type_hints(runners.update_index)["return"] is results.IndexSummary
    assert typing.get_type_hints(runners.promote)["return"] is results.PromoteResult
    assert typing.get_type_hints(runners.rollback)["return"] is results.RollbackResult
    assert typing.get_type_hints(runners.embed_corpus)["return"] is results.EmbedSummary
    assert typing.get_type_hints(runners.run_batch_inference)["return"] is results.BatchSummary
    assert typing.get_type_hints(runners.run_plain_loop)["return"] is results.BatchSummary
    # Keys that only some calls return are optional; the rest are always there.
    assert {"catalog_uri", "changes_uri", "shards_written"} == set(results.EmbedSummary.__optional_keys__)
    assert {"actors", "gpus_per_actor", "ray_address", "warm_actors", "resumed_partitions"} == set(results.BatchSummary.__optional_keys__)
    assert results.IndexSummary.__optional_keys__ == frozenset()


def test_one_error_hierarchy_exported_with_retryable_unchanged() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(runners, name) is cls and issubclass(cls, errors.RunnerError), name
    retryable = {name for name in errors.__all__ if getattr(errors, name).retryable}
    # A busy or taken-over store name frees itself: the writer lock's two errors retry.
    assert retryable == {"ModelServiceError", "GpuMemoryError", "RayConnectError", "StoreBusyError", "LeaseLostError",
                         "ComputeLostError"}
    assert issubclass(errors.StoreBusyError, errors.StoreError) and issubclass(errors.LeaseLostError, errors.StoreError)
    assert issubclass(errors.QualityGateError, errors.BackendUnavailableError)
    assert issubclass(errors.ModelServiceError, errors.ModelError) and issubclass(errors.GpuMemoryError, errors.ModelError)
    # The modules that raise them still hand out the same classes.
    from airflow_outpost.runners.batch.ray_session import RayAuthError, RayConnectError
    from airflow_outpost.runners.embeddings.ct2_backend import QualityGateError
    from airflow_outpost.runners.index.versions import IndexStateError
    from airflow_outpost.runners.model_service.protocol import GpuMemoryError, ModelServiceError

    assert (RayAuthError, RayConnectError, QualityGateError, IndexStateError, GpuMemoryError, ModelServiceError) == (
        errors.RayAuthError, errors.RayConnectError, errors.QualityGateError, errors.IndexStateError,
        errors.GpuMemoryError, errors.ModelServiceError)
    # Every class is drawn in the hierarchy of errors.py's docstring.
    assert all(f"+-- {name} " in errors.__doc__ for name in errors.__all__ if name != "RunnerError")
