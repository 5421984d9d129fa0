"""The worker-local model service: warm models across processes, idle release, one service per
socket under concurrent first clients, clear errors. Real model, real service processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from airflow_outpost.runners import ModelClient, ModelServiceError, ServiceEmbedder, embed_corpus
from airflow_outpost.runners.embeddings.chunking import ChunkingConfig, chunk_text
from airflow_outpost.runners.errors import GpuMemoryError, ModelError, ModelNotFoundError
from airflow_outpost.runners.model_service.client import make_embedder, ping
from airflow_outpost.runners.model_service.service import ModelService
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def sock() -> Path:
    # Short path: UNIX socket addresses are limited to 107 bytes, pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="ms-"))
    path = folder / "s.sock"
    yield path
    ModelClient(path, autostart=False).shutdown_service()
    shutil.rmtree(folder, ignore_errors=True)


def _in_new_process(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (a stand-in for the next task process); returns its JSON line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_gets_the_loaded_model_and_the_same_vectors(sock, model_path, torch_embedder):
    first = ServiceEmbedder(model_path, device="cpu", backend="torch", client=ModelClient(sock))
    assert first.loaded_now
    texts = ["The train to Amsterdam was delayed.", "refund my invoice please", "x " * 300]
    vectors = first.embed(texts)
    np.testing.assert_allclose(vectors, torch_embedder.embed(texts), rtol=0, atol=2e-6)
    assert first.record == torch_embedder.record and first.dim == torch_embedder.dim

    second = _in_new_process("""
        import json, sys
        from airflow_outpost.runners import ModelClient, ServiceEmbedder
        e = ServiceEmbedder(sys.argv[2], device="cpu", backend="torch", client=ModelClient(sys.argv[1]))
        v = e.embed(["refund my invoice please"])
        print(json.dumps({"loaded_now": e.loaded_now, "pid": e.service_pid, "v": v[0].tolist(),
                          "torch": "torch" in sys.modules}))
    """, str(sock), str(model_path))
    assert second["loaded_now"] is False and second["pid"] == first.service_pid
    np.testing.assert_allclose(second["v"], vectors[1], rtol=0, atol=2e-6)  # batched differently
    assert second["torch"] is False  # the warm path never imports torch in the task
    stats = ModelClient(sock, autostart=False).stats()
    assert stats["loads"] == 1
    [held] = stats["models"]
    assert (held["device"], held["backend"], held["calls"], held["texts"]) == ("cpu", "torch", 2, 4)

    # Chunking in the task uses tokenizer.json directly; it must cut exactly like the HF tokenizer.
    cfg = ChunkingConfig(chunk_tokens=24, overlap_tokens=4)
    for text in ["Hello, World! Ünïcödé and   spaces.\n" * 20, "short", "naïve café — résumé " * 30]:
        assert chunk_text(first.tokenizer, text, cfg) == chunk_text(torch_embedder.tokenizer, text, cfg)


def test_embed_corpus_through_the_service_matches_a_local_run(sock, model_path, torch_embedder, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i} about topic {i % 3} " * (i + 1)})
                              + "\n" for i in range(12)))
    remote = ServiceEmbedder(model_path, device="cpu", backend="torch", client=ModelClient(sock))
    first = embed_corpus(corpus, store=tmp_path / "store", embedder=remote)
    assert first["changed"] and first["embedded"] == 12 and first["backend"]["encoder"] == "service"
    # A local embedder with the same model and backend sees nothing to do: same chunks, same settings.
    again = embed_corpus(corpus, store=tmp_path / "store", embedder=torch_embedder)
    assert again["changed"] is False and torch_embedder.texts_encoded >= 0
    assert again["catalog_sha256"] == first["catalog_sha256"]


def test_idle_model_is_released_and_the_service_exits(sock, model_path):
    client = ModelClient(sock, idle_s=2)
    emb = ServiceEmbedder(model_path, device="cpu", backend="torch", client=client)
    emb.embed(["warm"])
    client.close()  # an open connection keeps the service alive; a finished task has none
    assert ping(sock) is not None
    deadline = time.monotonic() + 60
    while ping(sock) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ping(sock) is None and not sock.exists()
    log = sock.with_name(sock.name + ".log").read_text()
    assert "releasing" in log and "unused for" in log and "exiting" in log
    # The next client starts a fresh service and loads again.
    again = ServiceEmbedder(model_path, device="cpu", backend="torch", client=ModelClient(sock, idle_s=60))
    assert again.loaded_now and again.service_pid != emb.service_pid


def test_concurrent_first_clients_start_one_service(sock):
    code = """
        import json, sys
        from airflow_outpost.runners import ModelClient
        print(json.dumps({"pid": ModelClient(sys.argv[1], idle_s=30).stats()["pid"]}))
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(sock)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(4)]
    pids = {json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])["pid"] for p in procs}
    assert len(pids) == 1
    log = sock.with_name(sock.name + ".log").read_text()
    assert log.count("model service pid") == 1


def test_missing_model_path_fails_before_reaching_the_service(sock, tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        ServiceEmbedder(tmp_path / "nope", client=ModelClient(sock))
    assert ping(sock) is None  # nothing was started for a bad path


def test_unloadable_model_is_a_clear_error_and_the_service_survives(sock, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "modules.json").write_text("{ this is not json")
    client = ModelClient(sock, idle_s=30)
    with pytest.raises(ModelError, match="broken-model"):
        ServiceEmbedder(broken, device="cpu", backend="torch", client=client)
    assert client.stats()["loads"] == 0 and ping(sock) is not None


def test_gpu_load_is_refused_when_free_memory_is_short(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (300 * 2**20, 16 * 2**30))
    service = ModelService(tmp_path / "s.sock", idle_s=5, gpu_reserve_mb=512)
    with pytest.raises(GpuMemoryError, match=r"needs about 612 MiB .* only 300 of 16384 MiB are free") as info:
        service._check_gpu_memory("cuda:0", 100 * 2**20)
    assert info.value.retryable
    service.shutdown()
    service.shutdown()  # safe twice, and before run()
    assert service.run() == 0


def test_service_encoder_rejects_in_process_tuning(sock):
    with pytest.raises(ValueError, match="batch_tokens"):
        make_embedder(None, encoder="service", batch_tokens=512)
    with pytest.raises(ValueError, match="encoder='gpu'"):
        make_embedder(None, encoder="gpu")


def test_client_without_autostart_names_the_socket(sock):
    with pytest.raises(ModelServiceError, match=str(sock)):
        ModelClient(sock, autostart=False).stats()


def test_auto_backend_on_cpu_is_loaded_once_and_reports_what_it_chose(sock, model_path):
    client = ModelClient(sock)
    emb = ServiceEmbedder(model_path, device="cpu", backend="auto", client=client)
    assert emb.backend == "ct2-int8" and emb.precision == "int8"  # what the service's embedder chose
    first = emb.embed(["one text", "another"])
    again = ServiceEmbedder(model_path, device="cpu", backend="auto", client=ModelClient(sock))
    assert not again.loaded_now
    np.testing.assert_array_equal(again.embed(["one text", "another"]), first)
    held = client.stats()
    assert held["loads"] == 1 and [m["backend"] for m in held["models"]] == ["auto"]


def test_pings_do_not_keep_an_idle_service_alive(sock):
    import threading

    service = ModelService(sock, idle_s=1)
    service.bind()
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 20
    while runner.is_alive() and time.monotonic() < deadline:
        ping(sock)  # a health check every 50 ms, as a monitor might do
        time.sleep(0.05)
    assert not runner.is_alive(), "an idle service with no model stayed up because it was being pinged"
