"""Credentials and TLS for the connection to the control plane.

Three ways to authenticate Edge API requests, chosen by :func:`build_auth` from the settings:

* shared secret (``jwt_secret``/``jwt_secret_file``): the stock mode, signs a JWT per request
  (:class:`airflow_outpost.worker.edge.client.SharedSecretAuth`). The worker holds a secret that can forge tokens.
* ``token_file``: a token an identity agent (SPIFFE helper, Vault agent, a sidecar) writes and
  rotates; re-read whenever the file changes. For the edge3 OIDC mode (``[edge] trusted_jwks_url``).
* OAuth2 client credentials (``oidc_token_url``, ``oidc_client_id``, ``oidc_client_secret_file``,
  ``oidc_audience``): the worker obtains a token and refreshes it before it expires.

In both OIDC modes the worker holds nothing that can mint a token the server accepts on its own:
the token file or the client secret only identify it to the identity provider.

:func:`control_plane_ssl` builds the TLS context (custom CA bundle, optional client certificate
for mTLS) used by the Edge client, the egress gateway and the token endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from airflow_outpost.worker.errors import AuthError, ConfigError, ConnectError, CredentialError

if TYPE_CHECKING:
    from airflow_outpost.worker.config import Settings

log = logging.getLogger(__name__)


def control_plane_ssl(settings: Settings) -> ssl.SSLContext | bool:
    """TLS settings for httpx ``verify=``: the system CAs unless ``ca_bundle``; ``client_cert`` for mTLS."""
    if settings.ca_bundle is None and settings.client_cert is None:
        return True
    try:
        ctx = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("ca_bundle", str(settings.ca_bundle), f"a PEM file of CA certificates ({exc})") from exc
    if settings.client_cert is not None:
        try:
            ctx.load_cert_chain(str(settings.client_cert), str(settings.client_key) if settings.client_key else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("client_cert", str(settings.client_cert),
                              f"a PEM certificate with its key (or client_key) ({exc})") from exc
    return ctx


def _jwt_exp(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, ValueError, TypeError):
        return None


class TokenFileAuth:
    """Presents the token in ``path``; re-reads it when the file changes (an agent rotates it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._token: str | None = None

    def header(self, method_path: str) -> str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise CredentialError(f"token_file {self.path} cannot be read: {exc}") from exc
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                token = self.path.read_text().strip()
            except OSError as exc:
                raise CredentialError(f"token_file {self.path} cannot be read: {exc}") from exc
            if not token:
                raise CredentialError(f"token_file {self.path} is empty")
            if self._token is not None and token != self._token:
                log.info("token_file %s changed; using the new token", self.path)
            self._token, self._stamp = token, stamp
        assert self._token is not None
        return self._token


class ClientCredentialsAuth:
    """OAuth2 client-credentials grant; the token is refreshed before it expires.

    A new token is fetched once less than ``max(refresh_margin_s, 20% of its lifetime)`` remains.
    Concurrent requests share one refresh. The client secret is re-read from its file on each
    refresh, so rotating it needs no restart.
    """

    def __init__(self, token_url: str, client_id: str, secret_file: Path, *, audience: str | None = None,
                 scope: str | None = None, verify: ssl.SSLContext | bool = True, refresh_margin_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.token_url, self.client_id, self.secret_file = token_url, client_id, Path(secret_file)
        self.audience, self.scope, self.refresh_margin_s = audience, scope, refresh_margin_s
        self._http = httpx.AsyncClient(verify=verify, timeout=15, transport=transport)
        self._token: str | None = None
        self._expires = 0.0
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0

    async def header(self, method_path: str) -> str:
        if self._token is None or time.time() >= self._refresh_at:
            async with self._lock:
                if self._token is None or time.time() >= self._refresh_at:
                    await self._fetch()
        assert self._token is not None
        return self._token

    async def _fetch(self) -> None:
        form: dict[str, Any] = {"grant_type": "client_credentials", "client_id": self.client_id,
                                "client_secret": self.secret_file.read_text().strip()}
        if self.audience:
            form["audience"] = self.audience
        if self.scope:
            form["scope"] = self.scope
        try:
            resp = await self._http.post(self.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ConnectError(f"token endpoint {self.token_url} unreachable: {exc}") from exc
        if resp.status_code >= 500:
            raise ConnectError(f"token endpoint {self.token_url}: HTTP {resp.status_code}")
        if resp.status_code >= 400:
            raise AuthError(resp.status_code, "POST", self.token_url, resp.text[:300])
        try:
            body = resp.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(resp.status_code, "POST", self.token_url, f"no access_token in reply: {resp.text[:200]!r}") from exc
        now = time.time()
        expires = _jwt_exp(token) or now + float(body.get("expires_in") or 300)
        lifetime = max(1.0, expires - now)
        self._token, self._expires = token, expires
        self._refresh_at = expires - max(min(self.refresh_margin_s, lifetime / 2), lifetime * 0.2)
        self.fetched += 1
        log.info("obtained a worker token from %s, valid for %.0fs", self.token_url, lifetime)

    async def aclose(self) -> None:
        await self._http.aclose()


def build_auth(settings: Settings) -> Any:
    """The authenticator for the settings: token file, client credentials, or the shared secret."""
    if settings.token_file is not None:
        return TokenFileAuth(settings.token_file)
    if settings.oidc_token_url is not None:
        assert settings.oidc_client_id is not None and settings.oidc_client_secret_file is not None
        return ClientCredentialsAuth(settings.oidc_token_url, settings.oidc_client_id, settings.oidc_client_secret_file,
                                     audience=settings.oidc_audience, scope=settings.oidc_scope,
                                     verify=control_plane_ssl(settings))
    from airflow_outpost.worker.edge.client import SharedSecretAuth

    return SharedSecretAuth(settings.secret, settings.jwt_issuer)
