"""Every Prometheus metric of the server, on one app-owned registry. Names carry their units.

No prompt text or other unbounded values ever become label values.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# 1 ms to 10 min, about 1-2.5-5 per decade: the default model's stages take milliseconds, the 2B's at
# 1024x1024 seconds (minutes on a CPU); 30 s, the p95 alert's threshold, is a bucket edge.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "infinity_requests_total", "HTTP requests by endpoint and status class", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "infinity_request_duration_seconds",
            "End-to-end request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("infinity_images_generated_total", "Images generated", registry=r)
        self.image_tokens = Counter(
            "infinity_image_tokens_generated_total",
            "Bitwise image tokens generated (sum over scales of h*w*bits)",
            registry=r,
        )
        self.prompt_tokens = Counter("infinity_prompt_tokens_total", "T5 prompt tokens encoded", registry=r)
        self.image_inputs = Counter(
            "infinity_image_inputs_total",
            "Image-to-image requests admitted, by kind (edit: with a mask; variation: without)",
            ["kind"],
            registry=r,
        )
        for kind in ("edit", "variation"):
            self.image_inputs.labels(kind)  # exported at 0 before the first
        self.rejected = Counter(
            "infinity_rejected_requests_total", "Requests refused before running, by reason", ["reason"], registry=r
        )
        self.cancelled = Counter(
            "infinity_cancelled_requests_total", "Requests cancelled, by stage", ["stage"], registry=r
        )
        self.errors = Counter("infinity_errors_total", "Server-side failures, by reason", ["reason"], registry=r)
        self.worker_deaths = Counter(
            "infinity_worker_deaths_total", "Replica worker threads that died", ["device"], registry=r
        )
        self.worker_restarts = Counter(
            "infinity_worker_restarts_total", "Replica worker threads restarted", ["device"], registry=r
        )
        self.batch_splits = Counter(
            "infinity_batch_splits_total",
            "Failed batches retried as two halves, by reason (out_of_memory, generation)",
            ["reason"],
            registry=r,
        )
        self.previews_dropped = Counter(
            "infinity_previews_dropped_total",
            "Stream previews replaced unread by a newer one (a slow or stalled reader)",
            registry=r,
        )
        self.queue_depth = Gauge("infinity_queue_depth", "Images waiting in the queue", registry=r)
        self.running_rows = Gauge("infinity_running_rows", "Images being generated now", registry=r)
        self.batch_size = Histogram(
            "infinity_batch_size_images", "Images per executed batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "infinity_queue_wait_seconds", "Time from admission to batch start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "infinity_stage_duration_seconds",
            "Time per pipeline stage and batch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scale_step = Histogram(
            "infinity_scale_step_seconds",
            "Transformer time per scale and batch",
            ["scale"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.device_memory = Gauge(
            "infinity_device_memory_bytes",
            "Memory in use now (CUDA: allocated, reserved; CPU: rss, the resident set)",
            ["device", "kind"],
            registry=r,
        )
        self.device_memory_peak = Gauge(
            "infinity_device_memory_peak_bytes",
            "Most memory held since start, same kinds as infinity_device_memory_bytes",
            ["device", "kind"],
            registry=r,
        )
        self.text_cache_lookups = Counter(
            "infinity_text_cache_lookups_total",
            "Text-feature cache lookups by result (hit: T5 skipped)",
            ["device", "result"],
            registry=r,
        )
        self.text_cache_bytes = Gauge(
            "infinity_text_cache_bytes", "Bytes held by the text-feature cache", ["device"], registry=r
        )
        self.replica_up = Gauge(
            "infinity_replica_up",
            "1 while the replica's worker runs; 0 once it died past its restart budget",
            ["device"],
            registry=r,
        )
        self.ready = Gauge("infinity_ready", "1 when loaded, warmed and not draining", registry=r)
        self.build = Info("infinity_build", "Build and model information", registry=r)

    def set_device_memory(self, device: str, in_use: Mapping[str, int], peak: Mapping[str, int]) -> None:
        for kind, value in in_use.items():
            self.device_memory.labels(device, kind).set(value)
        for kind, value in peak.items():
            self.device_memory_peak.labels(device, kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
