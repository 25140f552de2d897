"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time, never logged.

`GENERATION_GUARDS` are the dependencies of every generation endpoint: the key, then the rate limit.
A matched key leaves its digest on `request.state.api_key_digest`: the rate limit's identity.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request

from server.errors import ServingError
from server.ratelimit import check_rate_limit


def unauthorized(message: str) -> ServingError:
    return ServingError(
        message,
        401,
        "invalid_request_error",
        "invalid_api_key",
        retryable=False,
        headers={"WWW-Authenticate": "Bearer"},
    )


def check_api_key(request: Request) -> None:
    """FastAPI dependency for the generation and model endpoints."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`")
    given = token.strip().encode()
    # Compare against every key (no early exit) so that timing says nothing about which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise unauthorized("invalid API key")
    request.state.api_key_digest = hashlib.sha256(given).hexdigest()[:32]


GENERATION_GUARDS = [Depends(check_api_key), Depends(check_rate_limit)]
