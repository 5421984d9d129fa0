"""TLS to the control plane (custom CA, mTLS) against a real TLS server with a throw-away CA
(trustme), and the OIDC credentials: a rotated token file and OAuth2 client credentials."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import trustme
import uvicorn

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.edge.auth import ClientCredentialsAuth, TokenFileAuth
from airflow_outpost.worker.edge.client import EdgeClient
from airflow_outpost.worker.egress.gateway import Egress
from airflow_outpost.worker.errors import ConfigError, ConnectError
from airflow_outpost.worker.testing.task_tokens import TaskTokens


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    transport_cert = scope.get("extensions", {}).get("tls", {}).get("client_cert_name")
    body = json.dumps({"version": "3.3.2", "path": scope["path"], "client": transport_cert}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("outpost-worker-eu-1")
    paths = {name: tmp / f"{name}.pem" for name in ("ca", "server", "client")}
    ca.cert_pem.write_to_path(paths["ca"])
    server_cert.private_key_and_cert_chain_pem.write_to_path(paths["server"])
    client_cert.private_key_and_cert_chain_pem.write_to_path(paths["client"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(_app, lifespan="off", log_config=None, ssl_certfile=str(paths["server"]),
                            ssl_ca_certs=str(paths["ca"]), ssl_cert_reqs=ssl.CERT_REQUIRED)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield {"url": f"https://localhost:{port}", **paths}
    server.should_exit = True
    thread.join(10)


def _settings(tls_server: dict, tmp_path: Path, **flags):
    return load_settings({"api_url": tls_server["url"], "state_folder": str(tmp_path / "state"), **flags},
                         env={"OUTPOST_JWT_SECRET": "x" * 32})


def test_mtls_with_a_custom_ca(tls_server: dict, tmp_path: Path) -> None:
    async def version(**flags) -> str:
        client = EdgeClient(_settings(tls_server, tmp_path, **flags))
        try:
            return await client.server_version()
        finally:
            await client.aclose()

    assert asyncio.run(version(ca_bundle=str(tls_server["ca"]), client_cert=str(tls_server["client"]))) == "3.3.2"
    with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(version(client_cert=str(tls_server["client"])))  # system CAs do not know ours
    with pytest.raises(ConnectError):
        asyncio.run(version(ca_bundle=str(tls_server["ca"])))  # the server demands a client certificate


def test_unusable_pem_is_a_config_error(tls_server: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="invalid setting ca_bundle"):
        EdgeClient(_settings(tls_server, tmp_path, ca_bundle=str(bad)))
    with pytest.raises(ConfigError, match="invalid setting client_cert"):
        EdgeClient(_settings(tls_server, tmp_path, client_cert=str(bad)))


def test_gateway_forwards_over_mtls(tls_server: dict, tmp_path: Path) -> None:
    async def main() -> dict:
        egress = Egress(_settings(tls_server, tmp_path, ca_bundle=str(tls_server["ca"]), client_cert=str(tls_server["client"])))
        url = await egress.start()
        try:
            async with httpx.AsyncClient(auth=TaskTokens(egress)) as plain:  # task processes speak plain HTTP on loopback
                return (await plain.get(url + "task-instances/x/previous-successful-dagrun")).json()
        finally:
            await egress.aclose()

    reply = asyncio.run(main())
    assert reply["path"] == "/execution/task-instances/x/previous-successful-dagrun"


def test_token_file_is_reread_when_rotated(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    auth = TokenFileAuth(path)
    assert auth.header("worker/w1") == "first-token"
    path.write_text("second-token-rotated\n")
    assert auth.header("jobs/fetch/w1") == "second-token-rotated"
    path.unlink()
    with pytest.raises(Exception, match="token_file"):
        auth.header("worker/w1")


def test_client_credentials_refresh_before_expiry(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    issued: list[dict] = []

    def idp(request: httpx.Request) -> httpx.Response:
        form = dict(x.split("=") for x in request.content.decode().split("&"))
        assert form["grant_type"] == "client_credentials" and form["client_secret"] == "s3cret"
        now = int(time.time())
        issued.append(form)
        token = jwt.encode({"sub": form["client_id"], "aud": form["audience"], "iat": now, "exp": now + 3},
                           "k" * 32, algorithm="HS256")
        return httpx.Response(200, json={"access_token": token, "token_type": "Bearer", "expires_in": 3})

    async def main() -> list[str]:
        auth = ClientCredentialsAuth("https://idp.test/token", "worker-eu-1", secret, audience="outpost",
                                     refresh_margin_s=30, transport=httpx.MockTransport(idp))
        tokens = [await auth.header("worker/w1"), await auth.header("worker/w1")]
        await asyncio.sleep(2.6)  # inside the refresh margin of the 3 s token: the next call refreshes
        tokens.append(await auth.header("worker/w1"))
        await auth.aclose()
        return tokens

    tokens = asyncio.run(main())
    assert tokens[0] == tokens[1] and tokens[2] != tokens[0]
    assert len(issued) == 2 and issued[0]["audience"] == "outpost"
