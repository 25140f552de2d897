"""Per-key (or per-address) rate limits: 429 with Retry-After, other clients unaffected."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

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
        r = _post(c, "/v1/images/generations", "key-a")           # both endpoints share the key's window
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-should-retry"] == "true"
        assert "key-a" not in r.text
        assert _post(c, "/generate", "key-b").status_code == 200   # another key is not throttled
        assert _post(c, "/generate", "wrong").status_code == 401   # auth comes first, and costs nothing
        assert 'infinity_rejected_requests_total{reason="rate_limited"} 1.0' in c.get("/metrics").text
        assert c.get("/healthz").status_code == 200                # health and metrics are never limited
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
