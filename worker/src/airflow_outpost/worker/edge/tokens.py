"""Reading the claims of a task's execution token, without verifying it.

The worker never holds the key that signs workload tokens (the control plane does), and it does
not need to: it only reads ``exp`` to tell a token that expired while its job waited in the queue
(the server would refuse it with a bare 403 once the task starts) from one that is still usable.
"""

from __future__ import annotations

import time
from typing import Any

import jwt


def claims(token: Any) -> dict[str, Any] | None:
    """The token's claims, unverified; ``None`` if it is not a readable JWT."""
    if not isinstance(token, str) or not token:
        return None
    try:
        data = jwt.decode(token, options={"verify_signature": False, "verify_exp": False, "verify_aud": False,
                                          "verify_nbf": False, "verify_iat": False})
    except jwt.PyJWTError:
        return None
    return data if isinstance(data, dict) else None


def expired_for(token: Any, now: float | None = None) -> float | None:
    """Seconds since the token expired, or ``None`` if it has not (or carries no readable ``exp``)."""
    exp = (claims(token) or {}).get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return None
    now = time.time() if now is None else now
    return now - exp if exp <= now else None
