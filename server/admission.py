"""Admission: whether a request may join the queue, and what is queued or running.

A request is refused at the door rather than after a wait: when its images need more KV cache than
the server's memory budget (400, naming `n`), when recent batch times say it cannot finish before
its deadline (503 with Retry-After), or when the queue is full (429). Admitted requests wait in the
dynamic batcher; `idle` (for the drain) says that nothing is queued and no taken batch is running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from model.schedules import ScaleSchedule
from server.batcher import Batcher, Ticket
from server.errors import ServingError, deadline_unreachable, invalid
from server.jobs import GenerationRequest
from server.metrics import CancelStage, ModelMetrics

EMA_WEIGHT = 0.3  # weight of the newest batch time in the moving average
MAX_RETRY_AFTER_S = 60.0


class BatchTimes:
    """Recent seconds per batch, for each replica and schedule (an exponential moving average)."""

    def __init__(self) -> None:
        self._ema: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def record(self, device: str, key: str, seconds: float) -> None:
        with self._lock:
            previous = self._ema.get((device, key))
            self._ema[(device, key)] = (
                seconds if previous is None else ((1 - EMA_WEIGHT) * previous + EMA_WEIGHT * seconds)
            )

    def fastest(self, key: str) -> float | None:
        """The fastest replica's recent time for this schedule; None before any batch of it ran."""
        with self._lock:
            known = [s for (_, k), s in self._ema.items() if k == key]
        return min(known) if known else None


class Admission:
    def __init__(
        self,
        queue: Batcher,
        metrics: ModelMetrics,
        replicas: int,
        kv_bytes_per_image: Callable[[ScaleSchedule, bool], int],
    ) -> None:
        self.queue, self.metrics, self.replicas = queue, metrics, replicas
        self.times = BatchTimes()
        self._kv_bytes_per_image = kv_bytes_per_image
        self._running: set[Ticket[GenerationRequest]] = set()
        self._lock = threading.Lock()

    def admit(self, request: GenerationRequest) -> Ticket[GenerationRequest]:
        # An image-to-image row costs as a plain one: its KV cache is the same, and its forced bits
        # (one (h, w, d) bool per scale) are small beside it; the input image is held once per request.
        kv = self._kv_bytes_per_image(request.schedule, request.guided) * request.images
        budget = self.queue.memory_budget
        if budget is not None and kv > budget:
            raise invalid(
                f"{request.images} images at this size need {kv} bytes of KV cache, more than the "
                f"server's budget of {budget}; ask for fewer images or a smaller size",
                "n",
            )
        estimate = self.estimated_wait(request.schedule.key)
        retry_after = min(MAX_RETRY_AFTER_S, max(1.0, estimate))
        if request.deadline - estimate < self.queue.now():
            self.metrics.rejected("deadline").inc()
            raise deadline_unreachable(retry_after)
        ticket = Ticket(request.schedule.key, request.images, kv, request.deadline, request)
        try:
            self.queue.put(ticket, retry_after=retry_after)
        except ServingError:
            self.metrics.rejected("queue_full").inc()
            raise
        return ticket

    def estimated_wait(self, key: str) -> float:
        """Seconds before a new request of this schedule could finish, from recent batch times."""
        seconds = self.times.fastest(key)
        if seconds is None:
            return 0.0
        batches_ahead = self.queue.depth / (self.queue.max_batch_size * self.replicas)
        return (batches_ahead + 1) * seconds

    def cancel(self, ticket: Ticket[GenerationRequest], reason: str) -> None:
        """Client gone or deadline passed: leave the queue now, or drop out at the next scale.

        Idempotent: a stream's end and its waiter's cancellation may both report one request."""
        if ticket.future.done() or ticket.cancelled:
            return
        ticket.cancel_reason = reason
        stage: CancelStage = "queued" if self.queue.remove(ticket) else "running"
        if stage == "queued":
            ticket.future.cancel()
        self.metrics.cancelled(stage).inc()

    def running(self, batch: Iterable[Ticket[GenerationRequest]]) -> None:
        """A batch left the queue (called under the queue's lock, so "queued or running" has no gap)."""
        with self._lock:
            self._running.update(batch)

    def finished(self, batch: Iterable[Ticket[GenerationRequest]]) -> None:
        with self._lock:
            self._running.difference_update(batch)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        with self._lock:
            busy = bool(self._running)
        return not busy and self.queue.depth == 0
