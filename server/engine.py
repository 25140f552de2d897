"""The engine: one worker thread per device replica, fed by the dynamic batcher.

The seam between server and model: `Engine.submit(GenerationRequest) -> Ticket` whose future
resolves to a `GenerationOutput`. Only plain dataclasses and numpy images cross it; the routes
never see tensors and the model never sees HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model.config import SamplingParams
from model.pipeline import DeviceOutOfMemory, InfinityPipeline, ScaleEvent
from model.schedules import ScaleSchedule
from server.batcher import Batcher, Ticket
from server.errors import (ServingError, cancelled, deadline_unreachable, draining, generation_failed, invalid,
                           nonfinite_sampling, not_ready, out_of_memory)
from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preview:
    scale_index: int
    num_scales: int
    images: list[np.ndarray]         # one per image of the request still running


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    schedule: ScaleSchedule
    params: tuple[SamplingParams, ...]     # one per image, each with its seed
    deadline: float                         # time.monotonic() by which it must finish
    preview_scales: frozenset[int] = frozenset()
    on_preview: Callable[[Preview], None] | None = None


@dataclass(frozen=True)
class GenerationOutput:
    schedule: ScaleSchedule                 # what was generated (the requested size snapped)
    images: list[np.ndarray]                # (H, W, 3) uint8 RGB
    seeds: list[int]
    width: int
    height: int
    prompt_tokens: int
    image_tokens: int                       # per image
    timings: dict[str, float]               # seconds: queue_wait, text_encode, transformer, vae_decode


@dataclass
class _Replica:
    device: str
    pipeline: InfinityPipeline
    thread: threading.Thread | None = None
    batch_seconds: dict[str, float] = field(default_factory=dict)   # EMA per schedule key
    deaths: list[float] = field(default_factory=list)                # monotonic times, recent only
    text_cache_seen: dict[str, int] = field(default_factory=dict)    # last stats exported as counters
    warmup_failed: bool = False
    retired: bool = False                                            # died past its restart budget

    @property
    def alive(self) -> bool:
        return not self.retired and self.thread is not None and self.thread.is_alive()


class Engine:
    def __init__(self, pipelines: dict[str, InfinityPipeline], metrics: Metrics, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0, max_queue: int = 64, memory_budget_bytes: int | None = None,
                 worker_restarts: int = 3, restart_window_s: float = 600.0) -> None:
        self.metrics = metrics
        self.replicas = [_Replica(d, p) for d, p in pipelines.items()]
        for r in self.replicas:                 # counters start from what the pipeline has seen so far
            stats = r.pipeline.text_cache_stats()
            r.text_cache_seen = {"hits": stats["hits"], "misses": stats["misses"]}
        self.batcher = Batcher(max_batch_size, max_wait_ms / 1000, max_queue, memory_budget_bytes,
                               on_change=metrics.queue_depth.set, on_take=self._mark_running)
        self.max_batch_size = max_batch_size
        self._running: set[Ticket] = set()
        self._lock = threading.Lock()
        self._accepting = False
        self._started = False
        self._broken = False                   # every worker died past its restart budget
        self._drain_deadline: float | None = None   # monotonic; set once shutdown begins
        self.worker_restarts, self.restart_window_s = worker_restarts, restart_window_s
        self.fault_hook: Callable[[list[GenerationRequest]], None] | None = None   # tests inject failures here

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, warmup: ScaleSchedule | None = None, warmup_batches: tuple[int, ...] = (1,)) -> None:
        """Start one worker per replica and return once each has warmed up (kernels, allocator, and
        compiled graphs: batch 1 and the largest batch, as a compiled graph specialises size 1).

        The warm-up runs in the worker thread itself: the torch work of a process should stay on
        one thread per replica (see server/main.py, where loading runs in a short-lived thread).
        """
        warm = [threading.Event() for _ in self.replicas]
        for r, event in zip(self.replicas, warm):
            self._start_worker(r, warmup=(warmup, warmup_batches, event))
        for event in warm:
            event.wait()
        failed = [r.device for r in self.replicas if r.warmup_failed]
        if failed:
            raise RuntimeError(f"warm-up failed on {failed}; see the log above")
        self._accepting = self._started = True
        self.metrics.ready.set(1)

    def _warm_up(self, replica: _Replica, schedule: ScaleSchedule | None, batches: tuple[int, ...]) -> None:
        for batch in batches if schedule is not None else ():
            t0 = time.perf_counter()
            replica.pipeline.generate(["warm-up"] * batch, schedule, SamplingParams(seed=0))
            log.info("replica %s warmed up on %s, batch %d, in %.2fs", replica.device, schedule.key, batch,
                     time.perf_counter() - t0)

    def _start_worker(self, replica: _Replica, warmup: tuple | None = None) -> None:
        replica.thread = threading.Thread(target=self._worker, args=(replica, warmup),
                                          name=f"replica-{replica.device}", daemon=True)
        replica.thread.start()
        self.metrics.replica_up.labels(replica.device).set(1)

    @property
    def ready(self) -> bool:
        """Can serve: admitting, and at least one replica's worker is alive (one dead replica of
        several must not take the whole pod out of its Service)."""
        return self._accepting and not self._broken and any(r.alive for r in self.replicas)

    @property
    def broken(self) -> bool:
        """Every replica's worker died past its restart budget: only a new process can serve again."""
        return self._broken

    def stop_admitting(self) -> None:
        """New requests get 503 and /readyz turns false; queued and running work continues."""
        self._accepting = False
        self.metrics.ready.set(0)

    def begin_drain(self, deadline: float) -> int:
        """Shutdown starts: admit nothing more, and fail what is queued with 503 (its retry lands on a
        live pod) so that only running batches have to finish before `deadline` (monotonic), the one
        deadline every later wait of the shutdown shares. Returns how many requests were refused."""
        self.stop_admitting()
        self._drain_deadline = deadline if self._drain_deadline is None else min(deadline, self._drain_deadline)
        return self.batcher.fail_all(draining())

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._running)
            if not busy and self.batcher.depth == 0:
                return True
            time.sleep(0.05)
        return False

    def drain(self, timeout: float) -> bool:
        """Stop admitting, fail what is queued, let running work finish within `timeout` (or what is
        left of a drain already begun), stop the workers; True if all finished."""
        now = time.monotonic()
        self.begin_drain(now + timeout)
        finished = self.wait_idle(max(0.0, self._drain_deadline - now))
        self.batcher.close()
        for r in self.replicas:
            if r.thread is not None:
                r.thread.join(timeout=max(0.0, min(1.0, self._drain_deadline - time.monotonic())))
        return finished

    def observe_memory(self, *replicas: _Replica) -> None:
        """Memory gauges (in use now and peak) of these replicas, or of all."""
        for replica in replicas or self.replicas:
            memory = replica.pipeline.memory_bytes()
            self.metrics.set_device_memory(replica.device, memory.in_use, memory.peak)

    # ---- model facts for the routes ---------------------------------------------------------
    @property
    def pipeline(self) -> InfinityPipeline:
        return self.replicas[0].pipeline

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Ticket:
        if not self._started or self._broken:
            raise not_ready()
        if not self._accepting:
            raise draining()
        guided = any(p.uses_guidance(request.schedule.num_scales) for p in request.params)
        per_image = self.pipeline.kv_cache_bytes_per_image(request.schedule, guided)
        kv = per_image * len(request.params)
        budget = self.batcher.memory_budget
        if budget is not None and kv > budget:
            raise invalid(f"{len(request.params)} images at this size need {kv} bytes of KV cache, more than the "
                          f"server's budget of {budget}; ask for fewer images or a smaller size", "n")
        estimate = self._estimated_wait(request.schedule.key)
        if time.monotonic() + estimate > request.deadline:
            self.metrics.rejected.labels("deadline").inc()
            raise deadline_unreachable(min(60.0, max(1.0, estimate)))
        ticket = Ticket(request.schedule.key, len(request.params), kv, request.deadline, request)
        try:
            self.batcher.put(ticket, retry_after=min(60.0, max(1.0, estimate)))
        except ServingError:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        return ticket

    def cancel(self, ticket: Ticket, stage_hint: str) -> None:
        """Client gone or deadline passed: leave the queue now, or drop out at the next scale.

        Idempotent: a stream's end and its waiter's cancellation may both report one request."""
        if ticket.future.done() or ticket.cancelled:
            return
        ticket.cancel_reason = stage_hint
        stage = "queued" if self.batcher.remove(ticket) else "running"
        if stage == "queued":
            ticket.future.cancel()
        self.metrics.cancelled.labels(stage).inc()

    def _estimated_wait(self, key: str) -> float:
        """Seconds before a new request of this schedule could finish, from recent batch times."""
        seconds = [r.batch_seconds.get(key) for r in self.replicas]
        known = [s for s in seconds if s is not None]
        if not known:
            return 0.0
        batches_ahead = self.batcher.depth / (self.max_batch_size * len(self.replicas))
        return (batches_ahead + 1) * min(known)

    # ---- worker -----------------------------------------------------------------------------
    def _mark_running(self, batch: list[Ticket]) -> None:
        with self._lock:
            self._running.update(batch)

    def _worker(self, replica: _Replica, warmup: tuple | None = None) -> None:
        try:
            if warmup is not None:                 # first start only; a restarted worker is warm
                schedule, batches, done = warmup
                try:
                    self._warm_up(replica, schedule, batches)
                except BaseException:
                    replica.warmup_failed = True
                    raise
                finally:
                    done.set()
            self._serve(replica)
        except BaseException as exc:      # noqa: BLE001 - a worker must never vanish unnoticed
            self._on_worker_death(replica, exc)

    def _serve(self, replica: _Replica) -> None:
        while True:
            batch = self.batcher.take()
            if batch is None:
                return
            try:
                live = [t for t in batch if not t.cancelled]
                if live:
                    self._run(replica, live)
            except BaseException:
                for t in batch:                # the thread is going down: nobody else would answer them
                    t.fail(generation_failed())
                raise
            finally:
                with self._lock:
                    self._running.difference_update(batch)

    def _on_worker_death(self, replica: _Replica, exc: BaseException) -> None:
        """Restart the worker within its budget; past it, retire the replica. With no replica left, fail
        what is queued and report broken (not ready, not live)."""
        log.critical("replica %s: worker thread died", replica.device, exc_info=exc)
        self.metrics.worker_deaths.labels(replica.device).inc()
        now = time.monotonic()
        replica.deaths = [t for t in replica.deaths if now - t < self.restart_window_s] + [now]
        if self._accepting and len(replica.deaths) <= self.worker_restarts:
            self.metrics.worker_restarts.labels(replica.device).inc()
            log.warning("replica %s: restarting its worker (%d of %d allowed in %.0fs)", replica.device,
                        len(replica.deaths), self.worker_restarts, self.restart_window_s)
            self._start_worker(replica)
            return
        replica.retired = True
        self.metrics.replica_up.labels(replica.device).set(0)
        log.critical("replica %s: not restarted (%d deaths in %.0fs); %d of %d replicas serve", replica.device,
                     len(replica.deaths), self.restart_window_s, sum(r.alive for r in self.replicas),
                     len(self.replicas))
        if not any(r.alive for r in self.replicas):
            self._broken = True
            self.metrics.ready.set(0)
            failed = self.batcher.fail_all(not_ready())
            log.critical("no replica left: %d queued requests failed with 503; /healthz now fails so that the "
                         "orchestrator restarts this process", failed)

    def _run(self, replica: _Replica, tickets: list[Ticket]) -> None:
        start = time.monotonic()
        for t in tickets:
            self.metrics.queue_wait.observe(start - t.enqueued)
        self._attempt(replica, tickets, start)

    def _attempt(self, replica: _Replica, tickets: list[Ticket], start: float) -> None:
        """Run one batch. Out of device memory, or failing for any other reason, retry it as two
        smaller batches, so that a request that cannot run fails alone and its batch-mates (whose
        images do not depend on the batch) still get them."""
        requests: list[GenerationRequest] = [t.payload for t in tickets]
        schedule = requests[0].schedule
        owners = [i for i, r in enumerate(requests) for _ in r.params]         # ticket index of each row
        prompts = [requests[i].prompt for i in owners]
        params = [p for r in requests for p in r.params]
        self.metrics.batch_size.observe(len(prompts))
        self.metrics.running_rows.inc(len(prompts))
        try:
            if self.fault_hook is not None:
                self.fault_hook(requests)
            result = replica.pipeline.generate(prompts, schedule, params,
                                               on_scale=lambda e: self._on_scale(replica, tickets, owners, e))
        except DeviceOutOfMemory:
            log.warning("out of device memory for %d images (requests %s)", len(prompts),
                        [r.request_id for r in requests])
            return self._bisect(replica, tickets, start, "out_of_memory")
        except Exception:
            log.exception("batch failed: requests %s", [r.request_id for r in requests])
            return self._bisect(replica, tickets, start, "generation")
        finally:
            self.metrics.running_rows.dec(len(prompts))
        elapsed = time.monotonic() - start
        previous = replica.batch_seconds.get(schedule.key)
        replica.batch_seconds[schedule.key] = elapsed if previous is None else 0.7 * previous + 0.3 * elapsed
        self._observe(result, replica)
        self._deliver(tickets, owners, result, start)

    def _bisect(self, replica: _Replica, tickets: list[Ticket], start: float, reason: str) -> None:
        """A failed batch: one request fails with its error; more are retried in two halves."""
        for t in tickets:
            if t.cancelled:                                  # gone while it ran: nothing to retry for it
                t.fail(cancelled())
        live = [t for t in tickets if not t.cancelled]
        if len(live) <= 1:
            self.metrics.errors.labels(reason).inc()
            for t in live:
                t.fail(out_of_memory() if reason == "out_of_memory" else generation_failed())
            return
        self.metrics.batch_splits.labels(reason).inc()
        half = len(live) // 2
        self._attempt(replica, live[:half], start)
        self._attempt(replica, live[half:], start)

    def _on_scale(self, replica: _Replica, tickets: list[Ticket], owners: list[int], event: ScaleEvent):
        self.metrics.scale_step.labels(str(event.scale_index)).observe(event.seconds)
        for i, t in enumerate(tickets):
            request: GenerationRequest = t.payload
            if t.cancelled or request.on_preview is None or event.scale_index not in request.preview_scales:
                continue
            positions = [p for p, row in enumerate(event.rows) if owners[row] == i]
            images = replica.pipeline.decode_latent(event.latent[positions])
            request.on_preview(Preview(event.scale_index, event.num_scales, list(images)))
        return {row for row in event.rows if tickets[owners[row]].cancelled}

    def _observe(self, result, replica: _Replica) -> None:
        m, t = self.metrics, result.timings
        m.stage.labels("text_encode").observe(t.text_encode)
        m.stage.labels("transformer").observe(t.transformer)
        m.stage.labels("vae_decode").observe(t.vae_decode)
        m.images.inc(len(result.images))
        m.image_tokens.inc(result.image_tokens * len(result.images))
        m.prompt_tokens.inc(sum(result.prompt_tokens))
        self.observe_memory(replica)
        cache = replica.pipeline.text_cache_stats()
        for result, key in (("hit", "hits"), ("miss", "misses")):   # counters move by what changed since
            m.text_cache_lookups.labels(replica.device, result).inc(cache[key] - replica.text_cache_seen[key])
            replica.text_cache_seen[key] = cache[key]
        m.text_cache_bytes.labels(replica.device).set(cache["bytes"])

    def _deliver(self, tickets: list[Ticket], owners: list[int], result, start: float) -> None:
        h, w = result.images[0].shape[:2] if result.images else (0, 0)
        for i, t in enumerate(tickets):
            rows = [k for k, row in enumerate(result.rows) if owners[row] == i]
            if t.future.done():
                continue
            if any(owners[row] == i for row in result.nonfinite):
                log.warning("request %s: non-finite logits, failed alone", t.payload.request_id)
                self.metrics.errors.labels("non_finite_logits").inc()
                t.fail(nonfinite_sampling())
                continue
            if not rows:                                   # every image of it was dropped (cancelled)
                t.fail(cancelled())
                continue
            timings = {"queue_wait": start - t.enqueued, "text_encode": result.timings.text_encode,
                       "transformer": result.timings.transformer, "vae_decode": result.timings.vae_decode}
            t.future.set_result(GenerationOutput(
                schedule=t.payload.schedule, images=[result.images[k] for k in rows], seeds=[result.seeds[k] for k in rows], width=w, height=h,
                prompt_tokens=result.prompt_tokens[rows[0]], image_tokens=result.image_tokens, timings=timings))
