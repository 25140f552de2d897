"""In-process tests of every endpoint, over the real engine and tiny real models."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.config import ScaleListError
from model.schedules import PN_NAMES
from server.routes_openai import QUALITY_PN
from server.settings import Settings
from tests.server.conftest import make_app


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_health_ready_models_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "model": "infinity-test", "models": {"infinity-test": True}}
    assert client.get("/v1/models").json()["data"][0]["id"] == "infinity-test"
    schema = client.get("/openapi.json").json()
    assert "/generate" in schema["paths"] and "/v1/images/generations" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_generate_json_returns_images_seeds_size_and_usage(client):
    r = client.post(
        "/generate", json={"prompt": "a red circle", "n": 2, "seed": 10}, headers={"x-request-id": "my-id-1"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-id-1"
    body = r.json()
    assert [i["seed"] for i in body["images"]] == [10, 11]
    assert (body["width"], body["height"], body["pn"], body["num_scales"]) == (64, 64, "0.06M", 7)
    assert png(body["images"][0]["b64"]).shape == (64, 64, 3)
    assert body["usage"]["image_tokens"] == 2 * 521 * 8
    assert body["usage"]["prompt_tokens"] == 4
    assert set(body["timings"]) == {"queue_wait", "text_encode", "transformer", "vae_decode"}


def test_generate_image_bytes_and_seed_reproducibility(client):
    def get(seed):
        r = client.post(
            "/generate", json={"prompt": "a star", "seed": seed, "tau": 1.0}, headers={"accept": "image/png"}
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-seed"] == str(seed)
        return r.content

    assert get(5) == get(5)
    assert get(5) != get(6)
    jpeg = client.post("/generate", json={"prompt": "a", "output_format": "jpeg"}, headers={"accept": "image/*"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"


def test_requested_size_snaps_to_a_template(client):
    body = client.post("/generate", json={"prompt": "a", "width": 1344, "height": 768}).json()
    assert body["h_div_w"] == 0.571 and body["pn"] == "0.25M"  # 1M asked, capped by the server
    assert (body["width"], body["height"]) == (42 * 4, 24 * 4)  # 24x42 tokens, tiny VAE stride 4
    body = client.post("/generate", json={"prompt": "a", "aspect_ratio": "1:2", "pn": "0.06M"}).json()
    assert body["h_div_w"] == 2.0 and (body["width"], body["height"]) == (11 * 4, 22 * 4)


BAD_BODIES = [
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 99}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a" * 5000}, "prompt"),
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "a", "tau": 0}, "tau"),
    ({"prompt": "a", "tau": 1e-30}, "tau"),
    ({"prompt": "a", "tau": 1e6}, "tau"),
    ({"prompt": "a", "tau": [1.0] * 6 + [1e-300]}, "tau"),
    ({"prompt": "a", "cfg": 1e30}, "cfg"),
    ({"prompt": "a", "cfg": -5}, "cfg"),
    ({"prompt": "a", "top_p": 2}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "cfg": "x"}, "cfg"),
    ({"prompt": "a", "cfg": [3.0, 3.0]}, "cfg"),
    ({"prompt": "a", "guidance": "none"}, "guidance"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "width": 512}, "body"),
    ({"prompt": "a", "aspect_ratio": "wide"}, "aspect_ratio"),
    ({"prompt": "a", "output_format": "bmp"}, "output_format"),
    ({"prompt": "a", "pn": "2M"}, "pn"),
    ({"prompt": "a", "pn": "1M"}, "pn"),
    ({"prompt": "a", "unknown_field": 1}, "unknown_field"),
    ({"prompt": "a", "width": 0, "height": 10}, "width"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_input_gets_400_naming_the_field(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false"
    assert param in error["message"] or param == "body"


def test_malformed_json_nan_and_oversized_bodies(client):
    r = client.post("/generate", content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/generate", content=b'{"prompt": "a", "cfg": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cfg"
    r = client.post("/generate", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/generate", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = client.get("/no/such/path")
    assert r.status_code == 404 and "error" in r.json()


def test_openai_endpoint_b64_and_url(client):
    r = client.post(
        "/v1/images/generations",
        json={
            "prompt": "a red circle",
            "n": 2,
            "size": "256x256",
            "seed": 3,
            "style": "vivid",
            "moderation": "low",
            "model": "infinity-test",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["size"] == "64x64" and body["output_format"] == "png"
    assert png(body["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert body["usage"]["output_tokens"] == 2 * 521 * 8
    r = client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url", "output_format": "webp"})
    url = r.json()["data"][0]["url"]
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert client.get("/v1/images/not-a-real-id").status_code == 404


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "a", "size": "big"}, "size"),
        ({"prompt": "a", "n": 9}, "n"),
        ({"prompt": "a", "response_format": "gif"}, "response_format"),
        ({"prompt": "a", "partial_images": 4}, "partial_images"),
    ],
)
def test_openai_errors_have_the_openai_shape(client, body, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["param"] == param


def test_every_layer_offers_the_models_pixel_budgets(client):
    """One list, model.schedules.PN_NAMES: the request schema (an enum), the settings, the OpenAI quality map."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["GenerateRequest"]["properties"]["pn"]["anyOf"][0] == {"enum": list(PN_NAMES), "type": "string"}
    settings = Settings.model_json_schema()["properties"]
    assert [settings[f]["anyOf"][0]["enum"] for f in ("default_pn", "max_pn")] == [list(PN_NAMES)] * 2
    assert set(QUALITY_PN.values()) <= set(PN_NAMES)


@pytest.mark.parametrize("field,values", [("cfg", [3.0, 3.0]), ("tau", [0.5] * 6)])
def test_a_short_per_scale_list_gets_the_same_400_from_both_endpoints(client, field, values):
    """Checked once, where the schedule is known; the message is the model's own (ScaleListError)."""
    expected = {
        "message": str(ScaleListError(field, len(values), 7)),
        "type": "invalid_request_error",
        "param": field,
        "code": "invalid_value",
    }
    for path in ("/generate", "/v1/images/generations"):
        r = client.post(path, json={"prompt": "a", field: values})
        assert (r.status_code, r.json()) == (400, {"error": expected}), path
    assert client.post("/generate", json={"prompt": "a", field: [values[0]] * 7}).status_code == 200


def test_a_failure_has_one_error_body_in_a_response_and_in_both_streams(app_and_engine, client):
    """JSON responses, the /generate `error` event and the OpenAI stream's bare `error` share one body."""
    engine = app_and_engine[1]

    def explode(requests):
        raise RuntimeError("injected fault")

    engine.fault_hook = explode
    body = client.post("/generate", json={"prompt": "a"}).json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    events = {}
    for path, name in (("/generate", "event: error"), ("/v1/images/generations", None)):
        text = client.post(path, json={"prompt": "a", "stream": True}).text
        lines = text.splitlines()
        pairs = itertools.pairwise(["", *lines])  # (the line before, the line)
        data = [d for e, d in pairs if d.startswith("data:") and (name is None or e == name)]
        events[path] = json.loads(data[-1][5:])
    assert events["/generate"] == events["/v1/images/generations"] == body


def test_api_keys(pipeline):
    app, engine = make_app(pipeline, api_keys=["secret-1", "secret-2"])
    try:
        c = TestClient(app)
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/generate", json={"prompt": "a"}, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
        r = c.post("/generate", json={"prompt": "a"}, headers={"authorization": "Bearer secret-2"})
        assert r.status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer secret-1"}).status_code == 200
    finally:
        engine.drain(5)


def _post_in_thread(client, results, body, path="/generate", headers=None):
    def run():
        results.append(client.post(path, json=body, headers=headers or {}))

    t = threading.Thread(target=run)
    t.start()
    return t


def test_queue_full_gives_429_with_retry_after(app_and_engine, client):
    app, engine, gate = app_and_engine
    gate.close()
    results = []
    threads = [_post_in_thread(client, results, {"prompt": "blocker"})]
    assert gate.entered.wait(10)  # one batch is running (held), the rest must queue
    threads += [_post_in_thread(client, results, {"prompt": "a", "n": 2, "seed": i}) for i in range(2)]
    deadline = time.monotonic() + 10
    while engine.batcher.depth < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.post("/generate", json={"prompt": "a", "n": 1})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-should-retry"] == "true"
    gate.opened.set()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in results) == [200, 200, 200]
    text = client.get("/metrics").text
    assert 'infinity_rejected_requests_total{model="infinity-test",reason="queue_full"} 1.0' in text


def test_deadline_from_the_client_read_timeout_gives_504_quickly(app_and_engine, client):
    app, engine, gate = app_and_engine
    gate.close()
    start = time.monotonic()
    r = client.post("/generate", json={"prompt": "a"}, headers={"x-stainless-read-timeout": "0.5"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - start < 5
    gate.opened.set()


def test_a_failing_batch_fails_each_request_and_the_server_goes_on(app_and_engine, client):
    app, engine, gate = app_and_engine

    def explode(requests):
        raise RuntimeError("injected fault")

    engine.fault_hook = explode
    r = client.post("/generate", json={"prompt": "a"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    assert "injected" not in r.text and "Traceback" not in r.text
    engine.fault_hook = None
    assert client.post("/generate", json={"prompt": "a"}).status_code == 200
    assert 'infinity_errors_total{model="infinity-test",reason="generation"} 1.0' in client.get("/metrics").text


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(app_and_engine, client):
    app, engine, gate = app_and_engine
    solo = {
        s: client.post("/generate", json={"prompt": p, "seed": s, "tau": 1.0}).json()["images"][0]["b64"]
        for s, p in ((1, "a red circle"), (2, "a blue square"), (3, "a green star"))
    }
    gate.close()
    results = []
    blocker = _post_in_thread(client, results, {"prompt": "x"})
    assert gate.entered.wait(10)
    threads = [
        _post_in_thread(client, results, {"prompt": p, "seed": s, "tau": 1.0})
        for s, p in ((1, "a red circle"), (2, "a blue square"), (3, "a green star"))
    ]
    deadline = time.monotonic() + 10
    while engine.batcher.depth < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.opened.set()
    for t in [blocker, *threads]:
        t.join(30)
    by_seed = {r.json()["images"][0]["seed"]: r.json()["images"][0]["b64"] for r in results}
    for seed, b64 in solo.items():
        assert np.array_equal(png(by_seed[seed]), png(b64))
    metrics = client.get("/metrics").text
    assert 'infinity_batch_size_images_bucket{le="2.0",model="infinity-test"}' in metrics
    sizes = [line for line in metrics.splitlines() if line.startswith("infinity_batch_size_images_bucket")]
    at_most_two = float(next(s for s in sizes if 'le="2.0"' in s).split()[-1])
    total = float(next(s for s in sizes if 'le="+Inf"' in s).split()[-1])
    assert total > at_most_two  # one batch held 3 requests


def test_generate_stream_sends_queued_previews_and_completed(client):
    with client.stream("POST", "/generate", json={"prompt": "a", "stream": True, "partial_images": 2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = [(block.split("\n")[0][7:], json.loads(block.split("\n")[1][6:])) for block in text.strip().split("\n\n")]
    names = [e for e, _ in events]
    assert names == ["queued", "preview", "preview", "completed"]
    assert [d["scale_index"] for e, d in events if e == "preview"] == [2, 4]
    assert png(events[1][1]["images"][0]).shape == (64, 64, 3)
    assert events[-1][1]["images"][0]["seed"] >= 0


@pytest.mark.static_batching  # two requests of other sizes leave the queue one batch at a time (continuous: together)
def test_a_queued_stream_hears_when_the_queue_moves(app_and_engine, client):
    app, engine, _ = app_and_engine
    release = [threading.Event(), threading.Event()]  # one per batch: the blocker, then "ahead"
    entered = [threading.Event(), threading.Event()]
    calls = []

    def hold(requests):
        i = len(calls)
        calls.append(i)
        if i < 2:
            entered[i].set()
            assert release[i].wait(30)

    engine.fault_hook = hold
    asked = [threading.Event(), threading.Event()]  # the stream looked up its place: at all, then 0
    place = engine.images_ahead

    def images_ahead(ticket):  # only the stream asks
        ahead = place(ticket)
        asked[0].set()
        if ahead == 0:
            asked[1].set()
        return ahead

    engine.images_ahead = images_ahead
    results = []
    threads = [_post_in_thread(client, results, {"prompt": "blocker"})]
    assert entered[0].wait(10)
    threads.append(_post_in_thread(client, results, {"prompt": "ahead", "aspect_ratio": "2:1"}))  # another size
    deadline = time.monotonic() + 10
    while engine.batcher.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads.append(_post_in_thread(client, results, {"prompt": "mine", "stream": True}))
    assert asked[0].wait(10)  # its first `queued` event is written: "ahead" is still queued
    release[0].set()  # the blocker finishes; "ahead" leaves the queue and is held
    assert entered[1].wait(10)
    assert asked[1].wait(10)  # a tick of the stream found "mine" next in line
    release[1].set()
    for t in threads:
        t.join(30)
    stream = next(r.text for r in results if r.headers["content-type"].startswith("text/event-stream"))
    lines = stream.splitlines()
    pairs = itertools.pairwise(lines)
    queued = [json.loads(data.split(":", 1)[1]) for event, data in pairs if event == "event: queued"]
    assert [q["images_ahead"] for q in queued] == [1, 0], queued
    assert "event: completed" in stream


def test_metrics_expose_every_documented_metric(client):
    client.post("/generate", json={"prompt": "a"})
    text = client.get("/metrics").text
    for name in (
        "infinity_requests_total",
        "infinity_request_duration_seconds_bucket",
        "infinity_images_generated_total",
        "infinity_image_tokens_generated_total",
        "infinity_prompt_tokens_total",
        "infinity_queue_depth",
        "infinity_running_rows",
        "infinity_batch_size_images_bucket",
        "infinity_queue_wait_seconds_bucket",
        'infinity_stage_duration_seconds_bucket{le="0.05",model="infinity-test",stage="transformer"}',
        'infinity_stage_duration_seconds_bucket{le="0.05",model="infinity-test",stage="vae_decode"}',
        'infinity_stage_duration_seconds_bucket{le="0.05",model="infinity-test",stage="text_encode"}',
        'infinity_scale_step_seconds_bucket{le="0.001",model="infinity-test",scale="6"}',
        "infinity_device_memory_bytes",
        'infinity_ready{model="infinity-test"} 1.0',
        "infinity_build_info",
    ):
        assert name in text, name
    # declared even before they first happen
    for name in ("infinity_rejected_requests_total", "infinity_cancelled_requests_total", "infinity_errors_total"):
        assert f"# TYPE {name[:-6]} counter" in text or f"# TYPE {name} counter" in text, name


def test_repeated_prompts_hit_the_text_feature_cache(client):
    for seed in (1, 2):
        assert client.post("/generate", json={"prompt": "a cached yellow star", "seed": seed}).status_code == 200
    text = client.get("/metrics").text
    assert 'infinity_text_cache_lookups_total{device="cpu",model="infinity-test",result="hit"} 1.0' in text
    assert 'infinity_text_cache_lookups_total{device="cpu",model="infinity-test",result="miss"} 1.0' in text


def test_out_of_device_memory_splits_the_batch_and_retries(app_and_engine, client):
    from model.pipeline import DeviceOutOfMemory

    app, engine, gate = app_and_engine
    gate.close()
    results = []
    blocker = _post_in_thread(client, results, {"prompt": "blocker"})
    assert gate.entered.wait(10)
    threads = [_post_in_thread(client, results, {"prompt": "a", "seed": s}) for s in range(3)]
    deadline = time.monotonic() + 10
    while engine.batcher.depth < 3 and time.monotonic() < deadline:
        time.sleep(0.01)

    def too_big(requests):
        if len(requests) > 1:
            raise DeviceOutOfMemory("injected: only one request fits")

    engine.fault_hook = too_big
    gate.opened.set()
    for t in [blocker, *threads]:
        t.join(30)
    assert sorted(r.status_code for r in results) == [200] * 4
    metrics = client.get("/metrics").text
    # 3 requests -> 1 + 2 -> 1 + 1 + 1
    assert 'infinity_batch_splits_total{model="infinity-test",reason="out_of_memory"} 2.0' in metrics
    engine.fault_hook = lambda requests: (_ for _ in ()).throw(DeviceOutOfMemory("injected"))
    r = client.post("/generate", json={"prompt": "a"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"


def test_the_guidance_preset_is_accepted_by_both_endpoints_and_changes_only_the_last_scale(client):
    def image(path: str, **extra) -> str:
        r = client.post(path, json={"prompt": "a red circle", "seed": 3, "tau": 1.0, **extra})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"] if path.startswith("/v1") else r.json()["images"][0]

    for path in ("/generate", "/v1/images/generations"):
        assert image(path, guidance="skip-last") == image(path, cfg=[3.0] * 6 + [1.0])
        assert image(path, guidance="skip-last") != image(path, guidance="full")
