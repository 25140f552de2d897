"""A replica: one device's pipeline and the worker thread that runs batches on it.

The thread takes batches from the queue until it closes. A batch that fails (out of device memory,
or any other error) is retried as two halves, so a request that cannot run fails alone while its
batch-mates, whose images do not depend on the batch, still get theirs. A thread that dies is
restarted within its budget (`restarts` deaths in `window_s`); past it the replica retires.

Torch work stays on this one thread per replica: the warm-up runs here too (see server/main.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model.config import SamplingParams
from model.pipeline import DeviceOutOfMemory, GenerationResult, InfinityPipeline, ScaleEvent
from model.schedules import ScaleSchedule
from server.admission import Admission
from server.batcher import BatchingMode, Ticket
from server.continuous import ContinuousLoop
from server.delivery import BatchDelivery
from server.errors import cancelled, generation_failed, out_of_memory
from server.jobs import GenerationRequest
from server.metrics import Failure, ModelMetrics

log = logging.getLogger(__name__)

FaultHook = Callable[[list[GenerationRequest]], None]  # tests inject failures before a batch runs


@dataclass(frozen=True)
class RestartPolicy:
    restarts: int = 3  # deaths tolerated within the window
    window_s: float = 600.0


@dataclass(frozen=True)
class Warmup:
    schedule: ScaleSchedule | None  # None: no warm-up
    batches: tuple[int, ...] = (1,)  # batch sizes to run once each


@dataclass
class _Health:
    deaths: list[float] = field(default_factory=list)  # monotonic times, recent only
    warmup_failed: bool = False
    retired: bool = False  # died past its restart budget


class Replica:
    def __init__(
        self,
        device: str,
        pipeline: InfinityPipeline,
        admission: Admission,
        metrics: ModelMetrics,
        policy: RestartPolicy,
        may_restart: Callable[[], bool],
        on_retired: Callable[[Replica], None],
        batching: BatchingMode = "static",
    ) -> None:
        self.device, self.pipeline, self.batching = device, pipeline, batching
        self.admission, self.metrics, self.policy = admission, metrics, policy
        self._may_restart, self._on_retired = may_restart, on_retired
        self.health = _Health()
        self.fault_hook: FaultHook | None = None
        self._thread: threading.Thread | None = None
        # the text cache is counted per text encoder: models naming the same T5 on one device share it
        metrics.start_replica(device, pipeline.text_encoder, pipeline.text_cache_stats())

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, warmup: Warmup | None = None, warmed: threading.Event | None = None) -> None:
        """Start the worker; with `warmup`, it first runs the warm-up batches and then sets `warmed`."""
        self._thread = threading.Thread(
            target=self._work, args=(warmup, warmed), name=f"replica-{self.device}", daemon=True
        )
        # up before the thread runs: a worker that dies at once (and retires) must leave the gauge at 0
        self.metrics.replica_up(self.device).set(1)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self.health.retired and self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def observe_memory(self) -> None:
        memory = self.pipeline.memory_bytes()
        self.metrics.set_device_memory(self.device, memory.in_use, memory.peak)

    # ---- the worker thread ------------------------------------------------------------------
    def _work(self, warmup: Warmup | None, warmed: threading.Event | None) -> None:
        try:
            if warmup is not None:  # first start only; a restarted worker is warm
                try:
                    self._warm_up(warmup)
                except BaseException:
                    self.health.warmup_failed = True
                    raise
                finally:
                    if warmed is not None:
                        warmed.set()
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a worker must never vanish unnoticed
            self._died(exc)

    def _warm_up(self, warmup: Warmup) -> None:
        schedule = warmup.schedule
        if schedule is None:
            return
        for batch in warmup.batches:
            t0 = time.perf_counter()
            self.pipeline.generate(["warm-up"] * batch, schedule, SamplingParams(seed=0))
            log.info(
                "replica %s warmed up on %s, batch %d, in %.2fs",
                self.device,
                schedule.key,
                batch,
                time.perf_counter() - t0,
            )

    def _serve(self) -> None:
        if self.batching == "continuous":
            return ContinuousLoop(self).run()
        while True:
            batch = self.admission.queue.take()
            if batch is None:
                return
            try:
                live = [t for t in batch if not t.cancelled]
                if live:
                    self._run(live)
            except BaseException:
                for t in batch:  # the thread is going down: nobody else would answer them
                    t.fail(generation_failed())
                raise
            finally:
                self.admission.finished(batch)

    def _died(self, exc: BaseException) -> None:
        """Restart within the budget; past it (or while shutting down), retire."""
        log.critical("replica %s: worker thread died", self.device, exc_info=exc)
        self.metrics.worker_deaths(self.device).inc()
        now = time.monotonic()
        deaths = self.health.deaths = [t for t in self.health.deaths if now - t < self.policy.window_s] + [now]
        if self._may_restart() and len(deaths) <= self.policy.restarts:
            self.metrics.worker_restarts(self.device).inc()
            log.warning(
                "replica %s: restarting its worker (%d of %d allowed in %.0fs)",
                self.device,
                len(deaths),
                self.policy.restarts,
                self.policy.window_s,
            )
            self.start()
            return
        self.health.retired = True
        self.metrics.replica_up(self.device).set(0)
        log.critical("replica %s: not restarted (%d deaths in %.0fs)", self.device, len(deaths), self.policy.window_s)
        self._on_retired(self)

    # ---- one batch --------------------------------------------------------------------------
    def _run(self, tickets: list[Ticket[GenerationRequest]]) -> None:
        start = time.monotonic()
        for t in tickets:
            self.metrics.queue_wait.observe(start - t.enqueued)
        self._attempt(tickets, start)

    def _attempt(self, tickets: list[Ticket[GenerationRequest]], start: float) -> None:
        delivery = BatchDelivery(tickets, self.pipeline, self.metrics)
        schedule, rows = delivery.requests[0].schedule, len(delivery.owners)
        self.metrics.batch_size.observe(rows)
        self.metrics.running_rows.inc(rows)
        self.metrics.running_batches.inc()
        try:
            if self.fault_hook is not None:
                self.fault_hook(delivery.requests)
            result = self.pipeline.generate(
                delivery.prompts,
                schedule,
                delivery.params,
                on_scale=lambda event: self.on_scale(delivery, event),
                images=delivery.conditions,
            )
        except DeviceOutOfMemory:
            log.warning(
                "out of device memory for %d images (requests %s)", rows, [r.request_id for r in delivery.requests]
            )
            return self.retry_apart(tickets, start, "out_of_memory")
        except Exception:
            log.exception("batch failed: requests %s", [r.request_id for r in delivery.requests])
            return self.retry_apart(tickets, start, "generation")
        finally:
            self.metrics.running_rows.dec(rows)
            self.metrics.running_batches.dec()
        self.admission.times.record(self.device, schedule.key, time.monotonic() - start)
        self.observe(result)
        delivery.deliver(result, start)

    def retry_apart(self, tickets: list[Ticket[GenerationRequest]], start: float, reason: Failure) -> None:
        """A failed batch (or continuous cohort): one request fails with its error; more are retried in
        two halves, each a batch of its own."""
        for t in tickets:
            if t.cancelled:  # gone while it ran: nothing to retry for it
                t.fail(cancelled())
        live = [t for t in tickets if not t.cancelled]
        if len(live) <= 1:
            self.metrics.errors(reason).inc()
            for t in live:
                t.fail(out_of_memory() if reason == "out_of_memory" else generation_failed())
            return
        self.metrics.batch_splits(reason).inc()
        half = len(live) // 2
        self._attempt(live[:half], start)
        self._attempt(live[half:], start)

    def on_scale(self, delivery: BatchDelivery, event: ScaleEvent) -> set[int]:
        self.metrics.scale_step(event.scale_index).observe(event.seconds)
        return delivery.on_scale(event)

    def observe(self, result: GenerationResult) -> None:
        m, t = self.metrics, result.timings
        m.stage("text_encode").observe(t.text_encode)
        m.stage("transformer").observe(t.transformer)
        m.stage("vae_decode").observe(t.vae_decode)
        if t.image_encode > 0:  # a batch with input images
            m.stage("image_encode").observe(t.image_encode)
        m.images.inc(len(result.images))
        m.image_tokens.inc(result.image_tokens * len(result.images))
        m.prompt_tokens.inc(sum(result.prompt_tokens))
        self.observe_memory()
        m.count_text_cache(self.device, self.pipeline.text_encoder, self.pipeline.text_cache_stats())
