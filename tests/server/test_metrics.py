"""Metrics that say what they measure: memory now vs. at the peak, units in names, buckets that resolve."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from tests.server.conftest import make_app

MiB = 2**20


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.fixture()
def client(pipeline):
    app, engine = make_app(pipeline)
    yield TestClient(app)
    engine.drain(5)


def memory(client: TestClient) -> tuple[float, float]:
    text = client.get("/metrics").text
    rss = sample(text, "infinity_device_memory_bytes", device="cpu", kind="rss")
    peak = sample(text, "infinity_device_memory_peak_bytes", device="cpu", kind="rss")
    assert rss is not None and peak is not None, text
    return rss, peak


def test_rss_is_memory_in_use_now_read_at_each_scrape_and_the_peak_is_its_own_series(client):
    before, peak = memory(client)  # no request has run: read by the scrape itself
    assert 0 < before <= peak
    buffer = np.ones(256 * MiB, dtype=np.uint8)  # written, so resident
    held, _ = memory(client)
    assert held >= before + 200 * MiB
    del buffer  # large blocks go back to the OS on free
    after, peak = memory(client)
    assert after <= held - 200 * MiB  # the current value goes down again...
    assert peak >= held - 8 * MiB  # ...the peak does not (the kernel's high-water mark
    # is taken lazily: it may miss pages held briefly)
    text = client.get("/metrics").text
    assert sample(text, "infinity_device_memory_bytes", device="cpu", kind="max_rss") is None


def test_the_batch_size_histogram_names_its_unit(client):
    assert client.post("/generate", json={"prompt": "a"}).status_code == 200
    text = client.get("/metrics").text
    assert sample(text, "infinity_batch_size_images_count") == 1
    assert "infinity_batch_size_bucket" not in text


@pytest.mark.parametrize(
    "histogram, labels",
    [("stage", {"stage": "transformer"}), ("queue_wait", {}), ("request_duration", {"endpoint": "/generate"})],
)
def test_latency_buckets_resolve_milliseconds_and_minutes(histogram, labels):
    metrics = Metrics()
    observed = getattr(metrics, histogram).labels(**labels) if labels else getattr(metrics, histogram)
    observed.observe(0.003)  # a default-model stage
    observed.observe(90)  # the 2B at 1024x1024 on a slow device
    name = {
        "stage": "infinity_stage_duration_seconds",
        "queue_wait": "infinity_queue_wait_seconds",
        "request_duration": "infinity_request_duration_seconds",
    }[histogram] + "_bucket"

    def below(le: str) -> float:
        return metrics.registry.get_sample_value(name, {**labels, "le": le})

    assert below("0.001") == 0 and below("0.005") == 1  # 3 ms is told apart from 1 ms and 50 ms
    assert below("60.0") == 1 and below("120.0") == 2  # 90 s is told apart from a minute and from +Inf
