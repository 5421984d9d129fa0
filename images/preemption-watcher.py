#!/usr/bin/env python3
"""Turn a cloud's spot/preemption signal into the worker's preemption notice file.

    python3 images/preemption-watcher.py --provider aws|gcp|azure --notice-file /var/lib/outpost/preempted

Polls the instance metadata service every ``--interval`` seconds (default 5). When the cloud
announces that the machine is being reclaimed, writes the notice file (atomically, with what
the cloud said) and exits 0; the worker (``--preemption-notice-file`` set to the same path)
then stops fetching and drains within ``--preemption-drain-timeout-s``. Standard library only,
so it runs next to the worker on any host or as a sidecar container. Metadata errors are
retried; ``--url`` replaces the metadata base URL (tests, proxies).

* aws: ``GET /latest/meta-data/spot/instance-action`` (404 until a stop or termination is
  scheduled), with an IMDSv2 session token.
* gcp: ``GET /computeMetadata/v1/instance/preempted`` (``TRUE`` once preempted), header
  ``Metadata-Flavor: Google``.
* azure: ``GET /metadata/scheduledevents`` (a ``Preempt`` event), header ``Metadata: true``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEFAULT_URLS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}


def _get(url: str, headers: dict[str, str], method: str = "GET", timeout_s: float = 2.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - metadata URL
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def check(provider: str, base: str) -> str | None:
    """What the cloud says about reclaiming this machine, or None while it says nothing."""
    if provider == "aws":
        status, token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, "PUT")
        headers = {"X-aws-ec2-metadata-token": token} if status == 200 else {}
        status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
        return body if status == 200 and body.strip() else None
    if provider == "gcp":
        status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        return "preempted" if status == 200 and body.strip().upper() == "TRUE" else None
    status, body = _get(f"{base}/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
    if status != 200:
        return None
    events = [e for e in json.loads(body or "{}").get("Events", []) if e.get("EventType") == "Preempt"]
    return json.dumps(events) if events else None


def write_notice(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".preempted-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", choices=sorted(DEFAULT_URLS), required=True)
    ap.add_argument("--notice-file", required=True, help="the worker's --preemption-notice-file")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    ap.add_argument("--url", default=None, help="metadata service base URL (default: the provider's)")
    args = ap.parse_args(argv)
    base = (args.url or DEFAULT_URLS[args.provider]).rstrip("/")
    while True:
        try:
            said = check(args.provider, base)
        except (OSError, ValueError) as exc:  # metadata briefly unreachable or garbled: poll again
            print(f"preemption-watcher: {args.provider} metadata: {exc}", file=sys.stderr)
            said = None
        if said is not None:
            write_notice(args.notice_file, f"{args.provider}: {said}")
            print(f"preemption-watcher: {args.provider} reclaims this machine; wrote {args.notice_file}", flush=True)
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
