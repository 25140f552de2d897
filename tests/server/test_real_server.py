"""A real uvicorn on 127.0.0.1, driven by the official `openai` client and plain httpx."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.server.conftest import Gate, make_app, running_server


@pytest.fixture()
def live(pipeline):
    app, engine = make_app(pipeline, api_keys=["sk-test"])
    gate = Gate()
    engine.fault_hook = gate
    with running_server(app) as url:
        yield url, engine, gate
    gate.opened.set()


def client_for(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, **kw)


AUTH = {"authorization": "Bearer sk-test"}


def hold_worker(url: str, gate) -> threading.Thread:
    """Close the gate and park one request in the worker, so that the next ones must queue."""
    gate.close()
    held = threading.Thread(
        target=lambda: httpx.post(f"{url}/generate", json={"prompt": "held"}, headers=AUTH, timeout=30)
    )
    held.start()
    assert gate.entered.wait(10)
    return held


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_openai_client_generates_with_extra_body(live):
    url, engine, gate = live
    client = client_for(url)
    r = client.images.generate(
        model="infinity-test",
        prompt="a red circle",
        n=2,
        size="256x256",
        extra_body={"seed": 42, "cfg": 4.0, "tau": 1.0, "negative_prompt": "blue"},
    )
    assert len(r.data) == 2 and r.size == "64x64" and r.usage.output_tokens == 2 * 521 * 8
    assert decode(r.data[0].b64_json).shape == (64, 64, 3)
    again = client.images.generate(
        model="infinity-test",
        prompt="a red circle",
        n=1,
        size="256x256",
        extra_body={"seed": 42, "cfg": 4.0, "tau": 1.0, "negative_prompt": "blue"},
    )
    assert np.array_equal(decode(again.data[0].b64_json), decode(r.data[0].b64_json))
    assert [m.id for m in client.models.list()] == ["infinity-test"]


def test_openai_client_url_response(live):
    url, engine, gate = live
    r = client_for(url).images.generate(prompt="a star", response_format="url", output_format="jpeg")
    image = httpx.get(r.data[0].url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_openai_client_streams_partial_images(live):
    url, engine, gate = live
    stream = client_for(url).images.generate(
        prompt="a green star", stream=True, partial_images=2, extra_body={"seed": 1}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).shape == (64, 64, 3) and events[-1].usage.output_tokens == 521 * 8


def test_openai_client_errors(live):
    url, engine, gate = live
    with pytest.raises(openai.BadRequestError) as err:
        client_for(url).images.generate(prompt="a", n=9)
    assert err.value.body["param"] == "n" and "between 1 and 4" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="a")


class PatientTransport(httpx.HTTPTransport):
    """Waits `read_s` for an answer whatever read timeout the request announces, so that the server's
    deadline, not the client's own timeout, is what ends a request."""

    def __init__(self, read_s: float) -> None:
        super().__init__()
        self.read_s = read_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["timeout"] = httpx.Timeout(self.read_s).as_dict()
        return super().handle_request(request)


def test_the_clients_announced_read_timeout_becomes_the_servers_deadline(live):
    """The SDK sends its read timeout (x-stainless-read-timeout: 1.0); the server gives up on the
    request then, with a 504, instead of keeping it queued for its own 600 s. The client here waits
    far longer than it announces: a server that ignored the header would leave it to time out."""
    url, engine, gate = live
    held = hold_worker(url, gate)
    client = client_for(url, timeout=1.0, http_client=httpx.Client(transport=PatientTransport(read_s=15)))
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.images.generate(prompt="a")
        assert err.value.status_code == 504 and err.value.body["code"] == "deadline_exceeded"
        assert engine.batcher.depth == 0  # it left the queue, cancelled by its deadline
        metrics = httpx.get(f"{url}/metrics").text
        assert 'infinity_cancelled_requests_total{model="infinity-test",stage="queued"} 1.0' in metrics
    finally:
        gate.opened.set()
        held.join(30)


def test_disconnect_removes_a_queued_request(live):
    url, engine, gate = live
    held = hold_worker(url, gate)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json={"prompt": "impatient"}, headers=AUTH, timeout=0.5)
    deadline = time.monotonic() + 5
    while engine.batcher.depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.batcher.depth == 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'infinity_cancelled_requests_total{model="infinity-test",stage="queued"} 1.0' in metrics
    gate.opened.set()
    held.join(30)


def test_disconnect_mid_generation_drops_the_rows(live):
    url, engine, gate = live
    gate.close()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json={"prompt": "running", "n": 2}, headers=AUTH, timeout=0.5)
    running = 'infinity_cancelled_requests_total{model="infinity-test",stage="running"} 1.0'
    assert wait_for_metric(url, running)  # noticed, still held
    gate.opened.set()
    assert engine.wait_idle(10)  # the batch ran to its end
    text = httpx.get(f"{url}/metrics").text
    assert 'infinity_images_generated_total{model="infinity-test"} 0.0' in text  # dropped at the first scale boundary
    errors = [line for line in text.splitlines() if line.startswith("infinity_errors_total{")]
    assert errors and all(line.endswith(" 0.0") for line in errors), errors  # an end, not a failure


def wait_for_metric(url: str, sample: str, timeout: float = 10) -> str:
    """The /metrics text once it has `sample` (polled: the server's threads get there in their own time)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics").text
        if sample in text:
            return text
        assert time.monotonic() < deadline, f"never saw {sample}"
        time.sleep(0.05)
