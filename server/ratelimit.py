"""Per-client rate limits: a moving window per API key (or per client address without keys).

The window arithmetic is the `limits` library's (in-memory storage, expired entries dropped by
it). The bucket id is a digest of the key, so keys never sit in memory under their own name
beyond the auth check, and never in logs.
"""

from __future__ import annotations

import hashlib
import time

from fastapi import Request
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from server.errors import ServingError


def rate_limited(retry_after: float, limit: str) -> ServingError:
    return ServingError(f"rate limit exceeded ({limit} per client); retry later", 429, "rate_limit_error",
                        "rate_limited", retry_after=retry_after, retryable=True)


class RateLimiter:
    def __init__(self, limit: str) -> None:
        self.item: RateLimitItem = parse(limit)     # e.g. "30/minute"; raises ValueError when malformed
        self.text = limit
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, client: str) -> None:
        """Count one request for `client`; raise 429 (with the seconds until a slot frees) when over."""
        if self._limiter.hit(self.item, client):
            return
        reset = self._limiter.get_window_stats(self.item, client).reset_time
        raise rate_limited(max(1.0, reset - time.time()), self.text)


def client_id(request: Request) -> str:
    """The API key's digest when one was sent, else the peer address."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]
    return "addr:" + (request.client.host if request.client else "unknown")


def check_rate_limit(request: Request) -> None:
    """FastAPI dependency for the generation endpoints (after the API key check)."""
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is None:
        return
    try:
        limiter.hit(client_id(request))
    except ServingError:
        request.app.state.metrics.rejected.labels("rate_limited").inc()
        raise
