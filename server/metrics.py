"""Every Prometheus metric of the server, on one app-owned registry. Names carry their units.

A server may serve several models (server/models.py), each with its own engine; they share this one
registry. Every series that concerns one model carries a `model` label (the first), whose values are
only ever served models' names: an engine writes through `Metrics.for_model(name)`, a view with that
label bound. HTTP-level series (requests, latency) and the process's device memory have no `model`.
No prompt text or other unbounded values ever become label values.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# 1 ms to 10 min, about 1-2.5-5 per decade: the default model's stages take milliseconds, the 2B's at
# 1024x1024 seconds (minutes on a CPU); 30 s, the p95 alert's threshold, is a bucket edge.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# The `model` of what happens before a request's model is known: the rate limit runs before the body
# is read, and an unhandled error may come from anywhere. Prometheus stores an empty label value as no
# label at all, so these series simply have no `model`; `sum` over models still counts them.
NO_MODEL = ""

# The label values of each labelled per-model series; each model exports them all at 0 from its start.
ImageInput = Literal["edit", "variation"]  # with a mask, without
Rejection = Literal["deadline", "queue_full"]  # per model; "rate_limited" has NO_MODEL
CancelStage = Literal["queued", "running"]
Failure = Literal["out_of_memory", "generation"]  # a batch that failed: split in two, or its one request fails
ModelError = Literal["non_finite_logits", "out_of_memory", "generation"]  # "unhandled" has NO_MODEL
Stage = Literal["text_encode", "transformer", "vae_decode", "image_encode"]
CacheResult = Literal["hit", "miss"]


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
        self.images = Counter("infinity_images_generated_total", "Images generated", ["model"], registry=r)
        self.image_tokens = Counter(
            "infinity_image_tokens_generated_total",
            "Bitwise image tokens generated (sum over scales of h*w*bits)",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter("infinity_prompt_tokens_total", "T5 prompt tokens encoded", ["model"], registry=r)
        self.image_inputs = Counter(
            "infinity_image_inputs_total",
            "Image-to-image requests admitted, by kind (edit: with a mask; variation: without)",
            ["model", "kind"],
            registry=r,
        )
        self.rejected = Counter(
            "infinity_rejected_requests_total",
            "Requests refused before running, by reason (rate_limited: before the model is known, no model)",
            ["model", "reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "infinity_cancelled_requests_total", "Requests cancelled, by stage", ["model", "stage"], registry=r
        )
        self.errors = Counter(
            "infinity_errors_total",
            "Server-side failures, by reason (unhandled: outside any model, no model)",
            ["model", "reason"],
            registry=r,
        )
        self.worker_deaths = Counter(
            "infinity_worker_deaths_total", "Replica worker threads that died", ["model", "device"], registry=r
        )
        self.worker_restarts = Counter(
            "infinity_worker_restarts_total", "Replica worker threads restarted", ["model", "device"], registry=r
        )
        self.batch_splits = Counter(
            "infinity_batch_splits_total",
            "Failed batches retried as two halves, by reason (out_of_memory, generation)",
            ["model", "reason"],
            registry=r,
        )
        self.previews_dropped = Counter(
            "infinity_previews_dropped_total",
            "Stream previews replaced unread by a newer one (a slow or stalled reader)",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge("infinity_queue_depth", "Images waiting in the queue", ["model"], registry=r)
        self.running_rows = Gauge("infinity_running_rows", "Images being generated now", ["model"], registry=r)
        self.running_batches = Gauge(
            "infinity_running_batches",
            "Batches in flight (static batching: one per busy replica; continuous: the running cohorts)",
            ["model"],
            registry=r,
        )
        self.batch_merges = Counter(
            "infinity_batch_merges_total",
            "Continuous batching: running batches merged into one once a later one caught up with an earlier one",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "infinity_batch_size_images", "Images per executed batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "infinity_queue_wait_seconds",
            "Time from admission to batch start",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "infinity_stage_duration_seconds",
            "Time per pipeline stage and batch",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scale_step = Histogram(
            "infinity_scale_step_seconds",
            "Transformer time per scale and batch",
            ["model", "scale"],
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
            ["model", "device", "result"],
            registry=r,
        )
        self.text_cache_bytes = Gauge(
            "infinity_text_cache_bytes",
            "Bytes held by the text-feature cache (models sharing a text encoder show the same cache)",
            ["model", "device"],
            registry=r,
        )
        self.replica_up = Gauge(
            "infinity_replica_up",
            "1 while the replica's worker runs; 0 once it died past its restart budget",
            ["model", "device"],
            registry=r,
        )
        self.ready = Gauge("infinity_ready", "1 when loaded, warmed and not draining", ["model"], registry=r)
        self.build = Info("infinity_build", "Build and model information", registry=r)
        self.text_cache_seen = TextCacheTally()

    def for_model(self, model: str) -> ModelMetrics:
        """The series of one served model, `model` bound, each exported at 0 from now on (a dashboard
        shows a model before its first request, and `increase()` sees its first event)."""
        assert model != NO_MODEL, "a served model has a name"
        view = ModelMetrics(
            self,
            model,
            images=self.images.labels(model),
            image_tokens=self.image_tokens.labels(model),
            prompt_tokens=self.prompt_tokens.labels(model),
            previews_dropped=self.previews_dropped.labels(model),
            queue_depth=self.queue_depth.labels(model),
            running_rows=self.running_rows.labels(model),
            running_batches=self.running_batches.labels(model),
            batch_merges=self.batch_merges.labels(model),
            ready=self.ready.labels(model),
            batch_size=self.batch_size.labels(model),
            queue_wait=self.queue_wait.labels(model),
        )
        for labelled, values in (
            (view.image_inputs, get_args(ImageInput)),
            (view.rejected, get_args(Rejection)),
            (view.cancelled, get_args(CancelStage)),
            (view.errors, get_args(ModelError)),
            (view.batch_splits, get_args(Failure)),
            (view.stage, get_args(Stage)),
        ):
            for value in values:
                labelled(value)  # creating the child exports it at 0
        return view

    def set_device_memory(self, device: str, in_use: Mapping[str, int], peak: Mapping[str, int]) -> None:
        for kind, value in in_use.items():
            self.device_memory.labels(device, kind).set(value)
        for kind, value in peak.items():
            self.device_memory_peak.labels(device, kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class ModelMetrics:
    """One served model's view of the shared families: the unlabelled-otherwise series as children
    already bound to `model`, the labelled ones as methods that bind it. An engine, its replicas and
    its requests write only through this, so one model's traffic moves only its own series."""

    owner: Metrics
    model: str
    images: Counter
    image_tokens: Counter
    prompt_tokens: Counter
    previews_dropped: Counter
    queue_depth: Gauge
    running_rows: Gauge
    running_batches: Gauge
    batch_merges: Counter
    ready: Gauge
    batch_size: Histogram
    queue_wait: Histogram

    def image_inputs(self, kind: ImageInput) -> Counter:
        return self.owner.image_inputs.labels(self.model, kind)

    def rejected(self, reason: Rejection) -> Counter:
        return self.owner.rejected.labels(self.model, reason)

    def cancelled(self, stage: CancelStage) -> Counter:
        return self.owner.cancelled.labels(self.model, stage)

    def errors(self, reason: ModelError) -> Counter:
        return self.owner.errors.labels(self.model, reason)

    def batch_splits(self, reason: Failure) -> Counter:
        return self.owner.batch_splits.labels(self.model, reason)

    def stage(self, stage: Stage) -> Histogram:
        return self.owner.stage.labels(self.model, stage)

    def scale_step(self, scale_index: int) -> Histogram:
        return self.owner.scale_step.labels(self.model, str(scale_index))

    # ---- per replica (device) ----
    def start_replica(self, device: str, text_cache: object, stats: Mapping[str, int]) -> None:
        """A replica's counters at 0 before their first event (`increase()`, which the worker-death
        alert uses, sees nothing in a series born at 1); its text cache (`text_cache`: the object that
        owns it, shared by models that share a text encoder) counted from what it has seen so far."""
        self.worker_deaths(device)
        self.worker_restarts(device)
        for result in get_args(CacheResult):
            self.text_cache_lookups(device, result)
        self.owner.text_cache_seen.start(text_cache, stats["hits"], stats["misses"])

    def count_text_cache(self, device: str, text_cache: object, stats: Mapping[str, int]) -> None:
        """After a batch: the cache's lookups since anyone last counted them, and the bytes it holds."""
        for result, count in self.owner.text_cache_seen.new(text_cache, stats["hits"], stats["misses"]).items():
            self.text_cache_lookups(device, result).inc(count)
        self.text_cache_bytes(device).set(stats["bytes"])

    def worker_deaths(self, device: str) -> Counter:
        return self.owner.worker_deaths.labels(self.model, device)

    def worker_restarts(self, device: str) -> Counter:
        return self.owner.worker_restarts.labels(self.model, device)

    def replica_up(self, device: str) -> Gauge:
        return self.owner.replica_up.labels(self.model, device)

    def text_cache_lookups(self, device: str, result: CacheResult) -> Counter:
        return self.owner.text_cache_lookups.labels(self.model, device, result)

    def text_cache_bytes(self, device: str) -> Gauge:
        return self.owner.text_cache_bytes.labels(self.model, device)

    def set_device_memory(self, device: str, in_use: Mapping[str, int], peak: Mapping[str, int]) -> None:
        """Process-wide, not per model: models on one device share its memory."""
        self.owner.set_device_memory(device, in_use, peak)


class TextCacheTally:
    """The lookups of each text-feature cache already counted. Models that name the same T5 on one
    device share one encoder and its cache (weights/text_encoders.py), so counting what changed since
    each replica last looked would count a shared cache's lookups once per model. Counted per cache
    instead, each lookup is counted once, under the model whose batch looked first after it (its own,
    unless two such models run batches at the same moment)."""

    def __init__(self) -> None:
        self._seen: dict[object, dict[CacheResult, int]] = {}  # by the cache's owner (held: no id reuse)
        self._lock = threading.Lock()  # replicas of models sharing a cache count on their own threads

    def start(self, cache: object, hits: int, misses: int) -> None:
        """Count from what `cache` has seen so far (a pipeline may have served another app before)."""
        with self._lock:
            self._seen.setdefault(cache, {"hit": hits, "miss": misses})

    def new(self, cache: object, hits: int, misses: int) -> dict[CacheResult, int]:
        """Lookups by result since the last call for this cache, by anyone. Never negative: another
        replica may have read the cache's counts after this one and counted them first."""
        with self._lock:
            seen = self._seen[cache]
            new: dict[CacheResult, int] = {"hit": max(0, hits - seen["hit"]), "miss": max(0, misses - seen["miss"])}
            seen["hit"], seen["miss"] = max(seen["hit"], hits), max(seen["miss"], misses)
            return new
