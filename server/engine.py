"""The engine: admission, a dynamic batcher and one worker per device replica, behind one seam.

`Engine.submit(GenerationRequest) -> Ticket` whose future resolves to a `GenerationOutput` (see
server/jobs.py). The parts, each in its own module: admission and queueing (admission.py,
batcher.py), replicas that run batches and recover (replica.py), and delivery of rows back to
requests (delivery.py). This class owns the lifecycle: start with warm-up, readiness, drain.
"""

from __future__ import annotations

import logging
import threading
import time

from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from server.admission import Admission
from server.batcher import Batcher, BatchingMode, Ticket
from server.errors import draining, not_ready
from server.jobs import GenerationOutput, GenerationRequest, Preview
from server.metrics import ModelMetrics
from server.replica import FaultHook, Replica, RestartPolicy, Warmup

__all__ = ["Engine", "GenerationOutput", "GenerationRequest", "Preview", "Ticket"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        pipelines: dict[str, InfinityPipeline],
        metrics: ModelMetrics,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        memory_budget_bytes: int | None = None,
        worker_restarts: int = 3,
        restart_window_s: float = 600.0,
        batching: BatchingMode = "static",
    ) -> None:
        self.metrics = metrics
        first = next(iter(pipelines.values()))
        self._admission = Admission(
            Batcher(
                max_batch_size,
                max_wait_ms / 1000,
                max_queue,
                memory_budget_bytes,
                on_change=metrics.queue_depth.set,
                on_take=lambda batch: self._admission.running(batch),
            ),
            metrics,
            replicas=len(pipelines),
            kv_bytes_per_image=first.kv_cache_bytes_per_image,
        )
        policy = RestartPolicy(worker_restarts, restart_window_s)
        self.replicas = [
            Replica(
                device,
                pipeline,
                self._admission,
                metrics,
                policy,
                may_restart=lambda: self._accepting,
                on_retired=self._retired,
                batching=batching,
            )
            for device, pipeline in pipelines.items()
        ]
        self._fault_hook: FaultHook | None = None
        self._accepting = False
        self._started = False
        self._broken = False  # every replica retired
        self._drain_deadline: float | None = None  # monotonic; set once shutdown begins

    @property
    def batcher(self) -> Batcher:
        """The queue (for tests and benchmarks; routes use `queue_depth` and `images_ahead`)."""
        return self._admission.queue

    @property
    def fault_hook(self) -> FaultHook | None:
        return self._fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: FaultHook | None) -> None:
        """Tests inject failures here: called with a batch's requests before it runs."""
        self._fault_hook = hook
        for replica in self.replicas:
            replica.fault_hook = hook

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, warmup: ScaleSchedule | None = None, warmup_batches: tuple[int, ...] = (1,)) -> None:
        """Start one worker per replica and return once each has warmed up (kernels, allocator, and
        compiled graphs: batch 1 and the largest batch, as a compiled graph specialises size 1)."""
        warmed = [threading.Event() for _ in self.replicas]
        for replica, event in zip(self.replicas, warmed, strict=True):
            replica.start(Warmup(warmup, warmup_batches), event)
        for event in warmed:
            event.wait()
        failed = [r.device for r in self.replicas if r.health.warmup_failed]
        if failed:
            raise RuntimeError(f"warm-up failed on {failed}; see the log above")
        self._accepting = self._started = True
        self.metrics.ready.set(1)

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
            if self._admission.idle:
                return True
            time.sleep(0.05)
        return False

    def drain(self, timeout: float) -> bool:
        """Stop admitting, fail what is queued, let running work finish within `timeout` (or what is
        left of a drain already begun), stop the workers; True if all finished."""
        now = time.monotonic()
        self.begin_drain(now + timeout)
        deadline = self._drain_deadline
        assert deadline is not None  # begin_drain set it
        finished = self.wait_idle(max(0.0, deadline - now))
        self.batcher.close()
        for r in self.replicas:
            r.join(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        return finished

    def _retired(self, replica: Replica) -> None:
        alive = sum(r.alive for r in self.replicas)
        log.critical("replica %s retired; %d of %d replicas serve", replica.device, alive, len(self.replicas))
        if alive:
            return
        self._broken = True
        self.metrics.ready.set(0)
        failed = self.batcher.fail_all(not_ready())
        log.critical(
            "no replica left: %d queued requests failed with 503; /healthz now fails so that the "
            "orchestrator restarts this process",
            failed,
        )

    def observe_memory(self) -> None:
        """Memory gauges (in use now and peak) of every replica."""
        for replica in self.replicas:
            replica.observe_memory()

    # ---- model facts for the routes ---------------------------------------------------------
    def image_size(self, schedule: ScaleSchedule) -> tuple[int, int]:
        """(height, width) in pixels of the images this schedule makes."""
        return self.replicas[0].pipeline.image_size(schedule)

    @property
    def token_bits(self) -> int:
        """Bits per image token of the served model."""
        return self.replicas[0].pipeline.transformer.config.token_bits

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Ticket[GenerationRequest]:
        if not self._started or self._broken:
            raise not_ready()
        if not self._accepting:
            raise draining()
        return self._admission.admit(request)

    def cancel(self, ticket: Ticket[GenerationRequest], reason: str) -> None:
        """Client gone ("disconnect"), deadline passed, or shutdown: see Admission.cancel."""
        self._admission.cancel(ticket, reason)

    @property
    def queue_depth(self) -> int:
        """Images waiting."""
        return self.batcher.depth

    def images_ahead(self, ticket: Ticket[GenerationRequest]) -> int | None:
        """Images queued before this ticket; None once it has left the queue."""
        return self.batcher.images_ahead(ticket)
