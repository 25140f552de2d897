"""Per-key (or per-address) rate limits: 429 with Retry-After, other clients unaffected, identities not
forgeable (tokens, X-Forwarded-For), memory bounded."""

from __future__ import annotations

import gc
import tracemalloc

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.errors import ServingError
from server.ratelimit import RateLimiter
from server.settings import Settings
from tests.server.conftest import make_app


def _post(client: TestClient, path: str, key: str | None = None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": "a red circle", "size": "256x256"} if path.startswith("/v1") else {"prompt": "a red circle"}
    return client.post(path, json=body, headers=headers)


def test_each_api_key_has_its_own_window(pipeline):
    app, engine = make_app(pipeline, api_keys=["key-a", "key-b"], rate_limit="2/minute")
    try:
        c = TestClient(app)
        assert [_post(c, "/generate", "key-a").status_code for _ in range(2)] == [200, 200]
        r = _post(c, "/v1/images/generations", "key-a")  # both endpoints share the key's window
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-should-retry"] == "true"
        assert "key-a" not in r.text
        assert _post(c, "/generate", "key-b").status_code == 200  # another key is not throttled
        assert _post(c, "/generate", "wrong").status_code == 401  # auth comes first, and costs nothing
        assert 'infinity_rejected_requests_total{model="",reason="rate_limited"} 1.0' in c.get("/metrics").text
        assert c.get("/healthz").status_code == 200  # health and metrics are never limited
    finally:
        engine.drain(5)


def test_without_keys_the_client_address_is_limited(pipeline):
    app, engine = make_app(pipeline, rate_limit="1/minute")
    try:
        c = TestClient(app)
        assert _post(c, "/generate").status_code == 200
        assert _post(c, "/generate").status_code == 429
    finally:
        engine.drain(5)


def test_a_malformed_rate_limit_is_refused_at_start_up():
    with pytest.raises(ValidationError, match="rate_limit"):
        Settings(rate_limit="lots per hour")
    with pytest.raises(ValidationError, match="at least one request"):
        Settings(rate_limit="0/minute")


@pytest.mark.parametrize("entry", ["proxy.internal", "10.0.0.0/33", "10.0.0.1/8", "*"])
def test_trusted_proxies_must_be_addresses_or_networks(entry):
    with pytest.raises(ValidationError, match=r"trusted_proxies: .* is not an IP address or CIDR"):
        Settings(trusted_proxies=[entry])
    assert Settings(trusted_proxies=["10.0.0.7", "10.0.0.0/8", "fd00::/8"]).trusted_proxies[1] == "10.0.0.0/8"


def test_fresh_bearer_tokens_without_keys_are_limited_by_address(pipeline):
    app, engine = make_app(pipeline, rate_limit="1/minute")
    try:
        c = TestClient(app)
        assert _post(c, "/generate", "random-token-1").status_code == 200
        assert _post(c, "/generate", "random-token-2").status_code == 429  # a new token is no new identity
        assert len(app.state.rate_limiter) == 1
    finally:
        engine.drain(5)


def test_an_invalid_key_gets_401_and_no_bucket(pipeline):
    app, engine = make_app(pipeline, api_keys=["key-a"], rate_limit="1/minute")
    try:
        c = TestClient(app)
        assert [_post(c, "/generate", f"guess-{i}").status_code for i in range(3)] == [401, 401, 401]
        assert _post(c, "/generate").status_code == 401
        assert len(app.state.rate_limiter) == 0
        assert _post(c, "/generate", "key-a").status_code == 200
    finally:
        engine.drain(5)


def _post_via(client: TestClient, forwarded_for: str):
    return client.post("/generate", json={"prompt": "a red circle"}, headers={"x-forwarded-for": forwarded_for})


def test_a_forged_forwarded_for_from_an_untrusted_peer_is_ignored(pipeline):
    app, engine = make_app(pipeline, rate_limit="1/minute", trusted_proxies=["10.0.0.0/8"])
    try:
        c = TestClient(app, client=("198.51.100.7", 40000))
        assert _post_via(c, "203.0.113.1").status_code == 200
        assert _post_via(c, "203.0.113.2").status_code == 429  # still 198.51.100.7
    finally:
        engine.drain(5)


def test_the_forwarded_address_is_used_from_a_trusted_proxy(pipeline):
    app, engine = make_app(pipeline, rate_limit="1/minute", trusted_proxies=["10.0.0.0/8"])
    try:
        proxy = TestClient(app, client=("10.0.0.1", 40000))
        assert _post_via(proxy, "203.0.113.1").status_code == 200
        assert _post_via(proxy, "203.0.113.2").status_code == 200  # another client behind the proxy
        # A client's own forged entry comes first; the proxy appends the address it saw: that one counts.
        assert _post_via(proxy, "192.0.2.99, 203.0.113.1").status_code == 429
        # Through two trusted proxies: the rightmost untrusted address is the client.
        assert _post_via(proxy, "203.0.113.3, 10.0.0.2").status_code == 200
    finally:
        engine.drain(5)


def test_the_real_server_ignores_forwarded_for_from_localhost(pipeline):
    """uvicorn's own default believes X-Forwarded-For from 127.0.0.1; `serve`'s configuration must not."""
    from server.main import uvicorn_config
    from tests.server.conftest import free_port, running_server

    app, engine = make_app(pipeline, rate_limit="1/minute", port=free_port())
    try:
        with running_server(app, uvicorn_config(app, app.state.settings)) as url:
            first = httpx.post(
                f"{url}/generate", json={"prompt": "a"}, headers={"x-forwarded-for": "203.0.113.1"}, timeout=60
            )
            second = httpx.post(
                f"{url}/generate", json={"prompt": "a"}, headers={"x-forwarded-for": "203.0.113.2"}, timeout=60
            )
        assert (first.status_code, second.status_code) == (200, 429)
    finally:
        engine.drain(5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_moves_and_says_when_a_slot_frees():
    clock = FakeClock()
    limiter = RateLimiter("2/minute", clock)
    for t in (1000.0, 1010.0):
        clock.now = t
        limiter.hit("a")
    clock.now = 1030.0
    with pytest.raises(ServingError) as refused:
        limiter.hit("a")
    assert refused.value.status == 429 and refused.value.retry_after == pytest.approx(30.0)  # 1000 + 60 - 1030
    limiter.hit("b")  # others are unaffected
    clock.now = 1060.0
    limiter.hit("a")  # the hit of 1000 left the window
    clock.now = 1065.0
    with pytest.raises(ServingError) as refused:
        limiter.hit("a")
    assert refused.value.retry_after == pytest.approx(5.0)  # 1010 + 60 - 1065


def test_a_sweep_forgets_only_clients_outside_their_window():
    clock = FakeClock()
    limiter = RateLimiter("1/second", clock)
    limiter.hit("old")
    clock.now += 0.9
    limiter.hit("recent")
    clock.now += 0.3  # past the first sweep time
    limiter.hit("new")
    assert len(limiter) == 2  # "old" forgotten
    with pytest.raises(ServingError):
        limiter.hit("recent")  # 0.3 s ago: still limited


def test_memory_stays_flat_over_100k_identities():
    clock = FakeClock()
    limiter = RateLimiter("1/second", clock)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            limiter.hit(f"addr:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert len(limiter) == 100_000
        grown = tracemalloc.get_traced_memory()[0] - before
        clock.now += 2.0  # the window has passed for all of them
        limiter.hit("addr:192.0.2.1")
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter) == 1
    assert grown > 5_000_000  # the measurement sees the identities ...
    assert after < 50_000, after  # ... and their memory is given back
