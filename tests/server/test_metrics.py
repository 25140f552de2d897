"""Metrics that say what they measure: memory now vs. at the peak, units in names, buckets that resolve."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import NO_MODEL, Metrics, TextCacheTally
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
    assert sample(text, "infinity_batch_size_images_count", model="infinity-test") == 1
    assert "infinity_batch_size_bucket" not in text


@pytest.mark.parametrize(
    "histogram, labels",
    [
        ("stage", {"model": "m", "stage": "transformer"}),
        ("queue_wait", {"model": "m"}),
        ("request_duration", {"endpoint": "/generate"}),
    ],
)
def test_latency_buckets_resolve_milliseconds_and_minutes(histogram, labels):
    metrics = Metrics()
    observed = getattr(metrics, histogram).labels(**labels)
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


# Series about the server or the process, not one model: they have no `model` label.
SERVER_WIDE = {
    "infinity_requests",
    "infinity_request_duration_seconds",
    "infinity_device_memory_bytes",
    "infinity_device_memory_peak_bytes",
    "infinity_build_info",
}


def _every_series(metrics: Metrics, *models: str) -> list:
    """The families, after each model has written every series it has (some appear only then)."""
    for name in models:
        view = metrics.for_model(name)
        view.start_replica("cpu", object(), {"hits": 0, "misses": 0})
        view.scale_step(0).observe(0.01)
        view.replica_up("cpu").set(1)
        view.text_cache_bytes("cpu").set(0)
    metrics.requests.labels("/generate", "2xx").inc()
    metrics.request_duration.labels("/generate").observe(0.1)
    metrics.set_device_memory("cpu", {"rss": 1}, {"rss": 1})
    metrics.build.info({"version": "dev"})
    families = text_string_to_metric_families(metrics.render().decode())
    return [f for f in families if not f.name.endswith("_created")]  # counters' start times, as gauges


def test_every_series_about_one_model_carries_its_model_label_and_exists_from_its_start():
    families = _every_series(Metrics(), "a", "b")
    per_model = [f for f in families if f.name not in SERVER_WIDE]
    assert len(per_model) == 23, sorted(f.name for f in per_model)
    for family in per_model:
        models = {s.labels.get("model") for s in family.samples}
        assert models == {"a", "b"}, (family.name, models)  # each model's own, at 0 before its first event
    for family in families:
        if family.name in SERVER_WIDE:
            assert all("model" not in s.labels for s in family.samples), family.name


def test_one_model_writes_only_its_own_series():
    metrics = Metrics()
    a = metrics.for_model("a")
    metrics.for_model("b")  # its series, at 0, written by nothing of `a`
    a.queue_depth.set(3)
    a.images.inc(2)
    a.ready.set(1)
    a.rejected("queue_full").inc()
    a.stage("transformer").observe(0.5)
    value = metrics.registry.get_sample_value
    for name, labels, of_a in (
        ("infinity_queue_depth", {}, 3),
        ("infinity_images_generated_total", {}, 2),
        ("infinity_ready", {}, 1),
        ("infinity_rejected_requests_total", {"reason": "queue_full"}, 1),
        ("infinity_stage_duration_seconds_count", {"stage": "transformer"}, 1),
    ):
        assert value(name, {"model": "a", **labels}) == of_a, name
        assert value(name, {"model": "b", **labels}) == 0, name


def test_before_a_model_is_known_a_series_has_no_model(client):
    """A rejection by the rate limit (before the body is read) or an unhandled error has no model: an
    empty label value, which Prometheus stores as no label. Never a name that no model has."""
    text = client.get("/metrics").text
    models = {s.labels.get("model") for f in text_string_to_metric_families(text) for s in f.samples}
    assert models <= {None, "infinity-test"}, models
    metrics = Metrics()
    metrics.rejected.labels(NO_MODEL, "rate_limited").inc()
    assert b'infinity_rejected_requests_total{model="",reason="rate_limited"} 1.0' in metrics.render()


def test_a_shared_text_cache_counts_each_lookup_once_even_when_read_out_of_order():
    tally, cache = TextCacheTally(), object()
    tally.start(cache, hits=2, misses=1)  # seen before this registry: not counted
    tally.start(cache, hits=3, misses=1)  # a second model's replica on the same cache: no restart
    assert tally.new(cache, hits=7, misses=2) == {"hit": 5, "miss": 1}  # one replica read late, counted first
    assert tally.new(cache, hits=6, misses=2) == {"hit": 0, "miss": 0}  # the other's earlier read: nothing new
    assert tally.new(cache, hits=8, misses=3) == {"hit": 1, "miss": 1}
