"""``outpost worker`` warns at start when it would speak plain HTTP to another host."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.preflight import warn_plain_http


def _warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture, **values: str) -> list[str]:
    settings = load_settings({"state_folder": str(tmp_path), **values}, env={})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="airflow_outpost.worker.preflight"):
        warn_plain_http(settings)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("url", ["http://airflow.example.com:8080", "http://10.0.0.7:8080", "http://[2001:db8::1]:8080"])
def test_plain_http_to_another_host_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str) -> None:
    [message] = _warnings(tmp_path, caplog, api_url=url)
    assert message.startswith(f"api_url {url} is plain http") and "use https" in message


def test_plain_http_oidc_token_url_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    messages = _warnings(tmp_path, caplog, api_url="https://airflow.example.com",
                         oidc_token_url="http://idp.example.com/token", oidc_client_id="w", oidc_client_secret_file=str(secret))
    assert [m.split(" ", 1)[0] for m in messages] == ["oidc_token_url"]


@pytest.mark.parametrize("url", ["https://airflow.example.com", "http://127.0.0.1:8080", "http://127.3.4.5:8080",
                                 "http://[::1]:8080", "http://localhost:8080", "http://LOCALHOST:8080"])
def test_https_or_loopback_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str) -> None:
    assert _warnings(tmp_path, caplog, api_url=url) == []
