"""Refused at the door, through the API: a request over the KV-memory budget (400 naming `n`) and one
that recent batch times say cannot finish before its deadline (503 with Retry-After). Real engine,
tiny real pipeline; no wall-clock threshold decides either."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from model.schedules import ScaleSchedule
from tests.server.conftest import LIMITS, make_app

ENDPOINTS = [("/generate", {}), ("/v1/images/generations", {"response_format": "b64_json"})]
SCHEDULE = ScaleSchedule.official(1.0, LIMITS.default_pn)  # what a request without a size gets


@pytest.mark.parametrize("path,extra", ENDPOINTS)
def test_a_request_over_the_kv_budget_gets_400_naming_n(pipeline, path, extra):
    per_image = pipeline.kv_cache_bytes_per_image(SCHEDULE, True)
    app, engine = make_app(pipeline, memory_budget_bytes=per_image * 3 // 2)  # room for one image
    try:
        client = TestClient(app)
        one = client.post(path, json={"prompt": "a red circle", "n": 1, "seed": 1, **extra})
        assert one.status_code == 200, one.text
        two = client.post(path, json={"prompt": "a red circle", "n": 2, "seed": 1, **extra})
        assert two.status_code == 400, two.text
        error = two.json()["error"]
        assert error["param"] == "n" and "KV cache" in error["message"]
    finally:
        engine.drain(5)


@pytest.mark.parametrize("path,extra", ENDPOINTS)
def test_a_deadline_shorter_than_a_batch_gets_503_with_retry_after(pipeline, path, extra):
    app, engine = make_app(pipeline)
    try:
        client = TestClient(app)
        first = client.post("/generate", json={"prompt": "a red circle", "seed": 1})
        assert first.status_code == 200, first.text
        timings = first.json()["timings"]
        batch = timings["text_encode"] + timings["transformer"] + timings["vae_decode"]  # <= the recorded batch time
        late = client.post(
            path,
            json={"prompt": "a red circle", "seed": 2, **extra},
            headers={"x-stainless-read-timeout": str(batch / 2)},
        )
        assert late.status_code == 503, late.text
        assert late.json()["error"]["code"] == "deadline_unreachable"
        assert 1 <= float(late.headers["retry-after"]) <= 60
        scrape = client.get("/metrics").text
        assert 'infinity_rejected_requests_total{model="infinity-test",reason="deadline"} 1.0' in scrape
    finally:
        engine.drain(5)
