"""Delivery when requests share a batch: each stream's previews hold only its own images, and a request
that asked for none is unaffected. Real engine, tiny real pipeline, the /generate stream."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.server.conftest import Gate, make_app, wait_until

STREAMS = {"a red circle": {"seed": 1, "n": 1}, "two blue stars": {"seed": 5, "n": 2}}
PLAIN = {"prompt": "a green square", "seed": 9}


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def stream(client: TestClient, prompt: str) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """(the images of each preview, the final images) of one /generate stream."""
    body = {"prompt": prompt, "stream": True, "partial_images": 2, **STREAMS[prompt]}
    text = client.post("/generate", json=body).text
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
        for block in text.strip().split("\n\n")
        if block.startswith("event:")
    ]
    assert [name for name, _ in events][-1] == "completed", text[-300:]
    previews = [[png(image) for image in data["images"]] for name, data in events if name == "preview"]
    return previews, [png(image["b64"]) for image in events[-1][1]["images"]]


# four queued requests form one batch after the blocker (continuous: max_batch_size counts the rows in flight)
@pytest.mark.static_batching
def test_streams_sharing_a_batch_get_previews_of_their_own_images_only(pipeline):
    app, engine = make_app(pipeline)
    gate = Gate()
    batches: list[list[str]] = []

    def hook(requests):
        batches.append(sorted(r.prompt for r in requests))
        gate(requests)

    engine.fault_hook = hook
    client = TestClient(app)
    try:
        alone = {prompt: stream(client, prompt) for prompt in STREAMS}  # each in a batch of its own
        plain_alone = client.post("/generate", json=PLAIN).json()["images"][0]["b64"]

        gate.close()
        results: dict = {}

        def run(name, fn):
            thread = threading.Thread(target=lambda: results.__setitem__(name, fn()))
            thread.start()
            return thread

        threads = [run("blocker", lambda: client.post("/generate", json={"prompt": "blocker"}))]
        assert gate.entered.wait(10)
        threads += [run(prompt, lambda p=prompt: stream(client, p)) for prompt in STREAMS]
        threads.append(run("plain", lambda: client.post("/generate", json=PLAIN)))
        assert wait_until(lambda: engine.queue_depth == 4)  # 1 + 2 + 1 images queued
        gate.opened.set()
        for t in threads:
            t.join(60)
        assert sorted([*STREAMS, PLAIN["prompt"]]) in batches  # they ran as one batch

        for prompt, settings in STREAMS.items():
            previews, images = results[prompt]
            solo_previews, solo_images = alone[prompt]
            assert len(previews) == 2 and all(len(p) == settings["n"] for p in previews), prompt
            for shared, own in zip(previews, solo_previews, strict=True):  # the same pixels as alone
                assert all(np.array_equal(a, b) for a, b in zip(shared, own, strict=True)), prompt
            assert all(np.array_equal(a, b) for a, b in zip(images, solo_images, strict=True)), prompt
        red, blue = (results[p][0][-1][0] for p in STREAMS)
        assert not np.array_equal(red, blue)  # previews differ per request
        assert results["plain"].status_code == 200
        assert np.array_equal(png(results["plain"].json()["images"][0]["b64"]), png(plain_alone))
    finally:
        gate.opened.set()
        engine.drain(5)
