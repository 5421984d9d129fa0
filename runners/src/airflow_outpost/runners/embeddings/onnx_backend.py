"""CPU fast path: ONNX Runtime with selective (sensitivity-ranked) dynamic int8 quantization.

Quantizing every Linear of a MiniLM-sized encoder to int8 costs too much quality (mean cosine
~0.984 to the fp32 model), and a few layers cause most of the loss (on all-MiniLM-L6-v2: the FFN
output projections of the first layers and the QKV projections of the middle ones). So, once
per model, we:

1. measure each Linear's quality loss alone with a fake-quant pass in torch that mimics ONNX
   Runtime's dynamic quantization (uint8 per-tensor activations, int8 per-channel weights);
2. pick Linears greedily by loss per multiply-add until the predicted loss budget is used;
3. export to ONNX, quantize exactly those MatMuls, and verify the real ONNX model against the
   fp32 reference on calibration texts; drop the worst picks and retry if it misses the floor,
   falling back to plain fp32 ONNX if nothing passes.

The result is cached under ``cache_dir`` keyed by the model's weights hash and the settings,
with a manifest recording the picks and the verified cosine. Building is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from airflow_outpost.runners.errors import BackendUnavailableError
from airflow_outpost.runners.store.atomic import atomic_directory

BUILD_VERSION = 1
# Predicted loss budget (1 - mean cosine) for the greedy pick, and the floor the real int8
# model must reach on calibration texts. Both are tighter than the 0.99 quality bar, to leave
# margin for texts that differ from the calibration set.
TARGET_COSINE = 0.998
VERIFY_COSINE = 0.994

_NATURAL = [
    "The quarterly report shows revenue growth in every region except the north-east.",
    "How do I reset my password if I no longer have access to my email account?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The train to Amsterdam was delayed by forty minutes because of a signal failure.",
    "Add two cups of flour, a pinch of salt and stir until the dough is smooth.",
    "Our API returns HTTP 429 when a client exceeds its rate limit; retry after the given delay.",
    "She walked along the beach at sunset, listening to the waves and the gulls.",
    "Patients with type 2 diabetes should monitor their blood glucose regularly.",
]


def calibration_texts(tokenizer: Any, n: int = 32, seed: int = 0) -> list[str]:
    """Deterministic mixed-length texts (natural sentences + vocabulary words, 5-120 words)."""
    rng = random.Random(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2)
    texts = list(_NATURAL)
    while len(texts) < n:
        k = rng.randint(5, 120)
        texts.append(" ".join(rng.choice(words) for _ in range(k)))
    return texts


def _fake_quant_input(x: Any) -> Any:
    import torch

    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / 255.0, min=1e-12)
    zp = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight(w: Any) -> Any:
    import torch

    scale = torch.clamp(w.abs().amax(dim=1, keepdim=True) / 127.0, min=1e-12)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def _features(st: Any, texts: list[str]) -> dict[str, Any]:
    return dict(st.tokenizer(texts, padding=True, truncation=True,
                             max_length=st.max_seq_length, return_tensors="pt"))


def _encode_torch(st: Any, features: dict[str, Any]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = st(dict(features))["sentence_embedding"].float()
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def rank_linears(st: Any, texts: list[str]) -> list[dict[str, Any]]:
    """Loss (1 - mean cosine) of quantizing each Linear alone, with its cost in multiply-adds."""
    import torch

    features = _features(st, texts)
    reference = _encode_torch(st, features)
    ranked = []
    for name, mod in st.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("pooler.dense"):
            continue
        original = mod.weight.data
        mod.weight.data = _fake_quant_weight(original)
        handle = mod.register_forward_pre_hook(lambda _m, args: (_fake_quant_input(args[0]),))
        try:
            got = _encode_torch(st, features)
        finally:
            handle.remove()
            mod.weight.data = original
        loss = float(1.0 - (got * reference).sum(axis=1).mean())
        ranked.append({"module": name, "loss": max(loss, 0.0), "macs": int(original.numel())})
    return ranked


def pick_linears(ranked: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
    """Greedy: cheapest loss per multiply-add first, while the summed loss stays within budget."""
    picked, used = [], 0.0
    for entry in sorted(ranked, key=lambda e: (e["loss"] / e["macs"], e["module"])):
        if used + entry["loss"] > budget:
            continue
        picked.append(entry)
        used += entry["loss"]
    return picked


def _export(st: Any, path: Path, input_names: list[str]) -> None:
    import torch

    class _Wrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(dict(zip(input_names, tensors, strict=True)))["sentence_embedding"]

    sample = tuple(torch.ones(2, 8, dtype=torch.long) for _ in input_names)
    axes = {n: {0: "batch", 1: "seq"} for n in input_names} | {"embedding": {0: "batch"}}
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and about tracer shortcuts
        # that do not apply to fixed-architecture encoders; neither is actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrapper(st).eval(), sample, str(path), input_names=input_names,
            output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False,
        )


def _matmul_nodes_for(onnx_path: Path, st: Any, modules: list[str]) -> list[str]:
    """Map torch Linear names to ONNX MatMul node names by matching weight contents."""
    import onnx
    from onnx import numpy_helper

    wanted = {}
    for name, mod in st.named_modules():
        if name in modules:
            w = mod.weight.detach().numpy().T
            wanted[hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()] = name
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            arr = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]))
            if hashlib.sha256(arr.tobytes()).hexdigest() in wanted:
                nodes.append(node.name)
    return nodes


class OnnxEncoder:
    """Runs an exported sentence-transformers model in ONNX Runtime on CPU. Pure ``encode``."""

    def __init__(self, onnx_path: Path, input_names: list[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_names = input_names

    def encode(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {n: np.asarray(features[n], dtype=np.int64) for n in self.input_names}
        return self.session.run(None, feeds)[0].astype(np.float32, copy=False)


def _verify(encoder: OnnxEncoder, st: Any, texts: list[str]) -> float:
    features = _features(st, texts)
    ref = _encode_torch(st, features)
    got = encoder.encode({k: v.numpy() for k, v in features.items()})
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    return float((got * ref).sum(axis=1).mean())


def build_onnx(
    st: Any, weights_hash: str, cache_dir: Path, *, quantize: bool, threads: int | None = None
) -> tuple[OnnxEncoder, dict[str, Any]]:
    """Return a ready encoder and its build record, building and caching the ONNX model if needed.

    ``quantize=False`` exports plain fp32. The cache entry is published atomically, so a
    concurrent or crashed build never leaves a partial model under the final name.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"ONNX backend needs onnx and onnxruntime: {exc}") from exc
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                   if n in st.tokenizer.model_input_names]
    key_src = json.dumps([BUILD_VERSION, weights_hash, quantize, TARGET_COSINE, VERIFY_COSINE,
                          input_names, st.max_seq_length], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    entry = Path(cache_dir) / f"onnx-{'int8sel' if quantize else 'fp32'}-{key}"
    if not (entry / "build.json").is_file():
        try:
            _build(st, entry, input_names, quantize, threads)
        except FileExistsError:
            pass  # another process published the same deterministic build first
    record = json.loads((entry / "build.json").read_text())
    return OnnxEncoder(entry / "model.onnx", input_names, threads), record


def _build(st: Any, entry: Path, input_names: list[str], quantize: bool, threads: int | None) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    texts = calibration_texts(st.tokenizer)
    with atomic_directory(entry) as tmp:
        fp32 = tmp / "fp32.onnx"
        _export(st, fp32, input_names)
        record: dict[str, Any] = {"build_version": BUILD_VERSION, "quantized": False, "picked": []}
        final = fp32
        if quantize:
            # A quarter of the texts is enough to rank; all of them verify the real build.
            ranked = rank_linears(st, texts[: len(texts) // 4])
            picked = pick_linears(ranked, 1.0 - TARGET_COSINE)
            record["ranked"] = ranked
            for attempt in range(3):
                if not picked:
                    break
                nodes = _matmul_nodes_for(fp32, st, [p["module"] for p in picked])
                candidate = tmp / f"int8-{attempt}.onnx"
                quantize_dynamic(
                    fp32, candidate, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_quantize=nodes,
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                )
                cosine = _verify(OnnxEncoder(candidate, input_names, threads), st, texts)
                record.setdefault("attempts", []).append(
                    {"picked": len(picked), "nodes": len(nodes), "cosine": cosine})
                if cosine >= VERIFY_COSINE:
                    final, record["quantized"] = candidate, True
                    record["picked"] = [p["module"] for p in picked]
                    break
                # Drop the quarter of picks with the highest measured loss and try again.
                picked = sorted(picked, key=lambda p: p["loss"])[: len(picked) * 3 // 4]
        record["calibration_cosine"] = _verify(OnnxEncoder(final, input_names, threads), st, texts)
        final.rename(tmp / "model.onnx")
        for leftover in tmp.glob("*.onnx"):
            if leftover.name != "model.onnx":
                leftover.unlink()
        (tmp / "build.json").write_text(json.dumps(record, indent=2, sort_keys=True))
