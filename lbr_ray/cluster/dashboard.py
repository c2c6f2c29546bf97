"""Talking to a Ray dashboard (the Jobs API server): its auth token, and a fast reachability probe."""
from __future__ import annotations

import os
from pathlib import Path

from lbr_ray.errors import LbrError

# (connect, read) seconds: an unreachable address must fail in seconds, not after TCP's minutes-long retries.
PROBE_TIMEOUT = (3.0, 5.0)


def auth_token() -> str | None:
    """Ray's dashboard token (token auth): $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` when a token is known; harmless for a cluster without token auth."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def probe(address: str, headers: dict[str, str] | None = None, timeout=PROBE_TIMEOUT) -> str:
    """Check that `address` is a Ray dashboard that accepts us; return its Ray version or raise LbrError."""
    import requests  # a Ray dependency; imported here so `lbr --help` stays fast

    url = address.rstrip("/") + "/api/version"
    try:
        r = requests.get(url, headers=headers or {}, timeout=timeout)
    except requests.exceptions.RequestException as e:
        reason = type(e).__name__.replace("Error", " error").replace("Timeout", "timeout").strip()
        raise LbrError(
            f"cannot reach the Ray dashboard at {address} ({reason}): start the cluster (`lbr cluster up FILE`), "
            "check `lbr cluster status FILE`, or fix the host/port (the dashboard port, 8265 by default)"
        ) from None
    if r.status_code == 401:
        raise LbrError(f"the Ray dashboard at {address} requires an auth token: set RAY_AUTH_TOKEN or write it to "
                       "~/.ray/auth_token (print it on the head with `ray get-auth-token`)")
    if r.status_code == 403:
        raise LbrError(f"the Ray dashboard at {address} rejected the auth token from RAY_AUTH_TOKEN / "
                       "~/.ray/auth_token: copy the cluster's token (`ray get-auth-token` on the head)")
    try:
        r.raise_for_status()
        return str(r.json()["ray_version"])
    except (ValueError, KeyError, requests.exceptions.HTTPError):
        raise LbrError(f"{address} answered HTTP {r.status_code} but is not a Ray dashboard: pass the dashboard "
                       "URL, e.g. http://HOST:8265 (not the GCS port 6379)") from None
