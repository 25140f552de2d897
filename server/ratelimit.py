"""Per-client rate limits: a moving window per authenticated API key, else per client address.

Identity is never taken from what a client merely claims: a bearer token counts only once
`check_api_key` has matched it (it leaves the key's digest on `request.state.api_key_digest`), and
`X-Forwarded-For` is applied to the client address, before this module sees it, only when the peer
is one of `trusted_proxies` (see `create_app`). Keys never sit here under their own name, nor in logs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi import Request
from limits import parse

from server.errors import ServingError
from server.metrics import NO_MODEL


def rate_limited(retry_after: float, limit: str) -> ServingError:
    return ServingError(
        f"rate limit exceeded ({limit} per client); retry later",
        429,
        "rate_limit_error",
        "rate_limited",
        retry_after=retry_after,
        retryable=True,
    )


class RateLimiter:
    """At most `amount` hits per client in any window of `window_s` seconds (a moving window).

    Why our own few lines and not `limits`' MemoryStorage (5.8): its moving window trims expired
    hits but keeps every key's (empty) list forever, and after each hit a timer thread rescans every
    key, so a stream of new identities grows memory and CPU without bound. Here a sweep, at most once
    per window, rebuilds the table without clients that have no hit inside the window (their state
    equals a fresh one, so forgetting them changes no answer). Memory is thus bounded by the clients
    seen in the last two windows, at most `amount` timestamps each; the sweep costs O(clients) once
    per window, O(1) per hit amortized.
    """

    def __init__(self, limit: str, clock: Callable[[], float] = time.monotonic) -> None:
        item = parse(limit)  # e.g. "30/minute"; raises ValueError when malformed
        self.text, self.amount, self.window_s = limit, item.amount, float(item.get_expiry())
        self._clock = clock
        self._hits: dict[str, list[float]] = {}  # client -> its accepted hit times, oldest first
        self._lock = threading.Lock()  # hits come from FastAPI's threadpool
        self._next_sweep = clock() + self.window_s

    def __len__(self) -> int:
        """The number of clients currently remembered."""
        return len(self._hits)

    def hit(self, client: str) -> None:
        """Count one request for `client`; raise 429 (with the seconds until a slot frees) when over."""
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            hits = self._hits.setdefault(client, [])
            if len(hits) == self.amount and now - hits[0] < self.window_s:
                raise rate_limited(max(1.0, hits[0] + self.window_s - now), self.text)
            hits.append(now)
            if len(hits) > self.amount:  # only the last `amount` hits decide the next answer
                del hits[0]

    def _sweep(self, now: float) -> None:
        # A new dict rather than deletions: a dict never shrinks its table when keys are removed.
        cutoff = now - self.window_s
        self._hits = {client: hits for client, hits in self._hits.items() if hits[-1] > cutoff}
        self._next_sweep = now + self.window_s


def client_id(request: Request) -> str:
    """The authenticated API key's digest, else the client address (a proxy's header applied upstream)."""
    digest: str | None = getattr(request.state, "api_key_digest", None)
    if digest is not None:
        return "key:" + digest
    return "addr:" + (request.client.host if request.client else "unknown")


def check_rate_limit(request: Request) -> None:
    """FastAPI dependency for the generation endpoints (after the API key check)."""
    limiter: RateLimiter | None = request.app.state.rate_limiter
    if limiter is None:
        return
    try:
        limiter.hit(client_id(request))
    except ServingError:
        # Before the body is read, so before its model is known: counted with no model.
        request.app.state.metrics.rejected.labels(NO_MODEL, "rate_limited").inc()
        raise
