"""OIDC mode end to end: a second real control plane trusts a local identity provider (JWKS +
OAuth2 token endpoint, RS256); the worker holds only a client secret for that provider, never
the control plane's ``jwt_secret``, and a DAG runs through it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from airflow_outpost.worker.testing.controlplane import ControlPlane
from airflow_outpost.worker.testing.worker_process import WorkerProc
from tests.helpers import DAGS

pytestmark = pytest.mark.controlplane  # ~40 s with its own control plane: in the default run

ISSUER = "https://idp.region.test"
AUDIENCE = "outpost-workers"
CLIENT_ID = "worker-eu-1"
CLIENT_SECRET = "client-secret-known-only-to-the-idp-and-the-worker"


class IdentityProvider:
    """JWKS at /jwks.json and a client-credentials token endpoint at /token, on loopback."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        self.issued = 0
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwks = json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}).encode()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200, jwks) if self.path == "/jwks.json" else self._send(404, b"{}")

            def do_POST(self) -> None:
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                    self._send(401, b'{"error": "invalid_client"}')
                    return
                now = int(time.time())
                token = jwt.encode({"iss": ISSUER, "aud": form.get("audience"), "sub": CLIENT_ID, "iat": now,
                                    "exp": now + 120}, idp.key, algorithm="RS256", headers={"kid": idp.kid})
                idp.issued += 1
                self._send(200, json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": 120}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def oidc_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, IdentityProvider]]:
    idp = IdentityProvider()
    cp = ControlPlane(dags_folder=DAGS, home=tmp_path_factory.mktemp("airflow-oidc"), extra_env={
        "AIRFLOW__EDGE__TRUSTED_JWKS_URL": f"{idp.url}/jwks.json",
        "AIRFLOW__EDGE__JWT_ISSUER": ISSUER,
        "AIRFLOW__EDGE__JWT_AUDIENCE": AUDIENCE,
    })
    cp.start()
    try:
        yield cp, idp
    finally:
        cp.stop()
        idp.close()


def test_worker_runs_a_dag_with_client_credentials_only(oidc_control_plane, tmp_path: Path) -> None:
    cp, idp = oidc_control_plane
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET)
    w = WorkerProc(cp, tmp_path, queues="q_chain", extra_args=[
        "--oidc-token-url", f"{idp.url}/token", "--oidc-client-id", CLIENT_ID,
        "--oidc-client-secret-file", str(secret_file), "--oidc-audience", AUDIENCE])
    w.env.pop("OUTPOST_JWT_SECRET")  # no secret that could forge a token the control plane accepts
    assert not any(cp.jwt_secret in v for v in w.env.values())
    w.start()
    try:
        run_id = cp.trigger("outpost_chain")
        assert cp.wait_for_run("outpost_chain", run_id, timeout_s=180) == "success", cp.task_states("outpost_chain", run_id)
        assert cp.xcom("outpost_chain", run_id, "describe") == "outpost:40"
        assert idp.issued >= 1
    finally:
        assert w.stop() == 0, w.log()[-3000:]


def test_worker_with_a_token_the_idp_did_not_sign_is_refused(oidc_control_plane, tmp_path: Path) -> None:
    cp, _ = oidc_control_plane
    forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "intruder", "iat": int(time.time()),
                         "exp": int(time.time()) + 60}, cp.jwt_secret, algorithm="HS256")
    token_file = tmp_path / "token"
    token_file.write_text(forged)
    w = WorkerProc(cp, tmp_path, queues="q_chain", extra_args=["--token-file", str(token_file)])
    w.env.pop("OUTPOST_JWT_SECRET")
    w.start(wait_registered=False)
    assert w.wait(60) == 1
    assert "refused this worker's credentials" in w.log() or "HTTP 403" in w.log(), w.log()[-2000:]
