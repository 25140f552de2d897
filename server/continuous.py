"""Continuous batching at scale boundaries: a request starts at the next scale, not after the batch.

The static batcher (server/batcher.py `take`) runs a batch's every scale before it looks at the queue
again. Here a replica's worker runs a loop of steps instead. At each scale boundary it admits the
queued requests that fit beside the running ones (arrival order, `max_batch_size` images and the KV
budget over everything in flight, the whole schedule's cache reserved at admission), as new cohorts
that begin at scale 0; then every cohort runs its next scale; a cohort whose last scale is done is
decoded and delivered at once, without waiting for the others.

A cohort is the requests of one schedule admitted at one boundary: one `Generation` (model/pipeline.py)
with its own KV cache, text and generators. Cohorts never share a tensor, so a seed's image is the
same alone, in a static batch, or joined mid-flight (tests/server/test_continuous.py), whatever runs
beside it. Their scales run one after another within a step: each cohort's GEMMs, attention and
elementwise ops are dispatched for its rows only (fusing cohorts into one pass is future work,
docs/serving.md#continuous-batching).

Everything else is the static path's: previews and cancellation through the cohort's delivery at each
of its scales, the metrics, and failure isolation: a cohort that fails (out of memory or any error) is
retried alone, in halves, by the replica's static path, while the other cohorts wait one step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.pipeline import DeviceOutOfMemory, Generation, GenerationResult
from server.batcher import Ticket
from server.delivery import BatchDelivery
from server.errors import generation_failed
from server.jobs import GenerationRequest
from server.metrics import Failure

if TYPE_CHECKING:  # the replica owns the loop; imported for types only (no cycle at run time)
    from server.replica import Replica

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Requests of one schedule admitted at one boundary, running together scale by scale."""

    tickets: list[Ticket[GenerationRequest]]
    delivery: BatchDelivery
    generation: Generation
    started: float  # monotonic: admission into the running set

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tickets)

    @property
    def kv_bytes(self) -> int:
        return sum(t.kv_bytes for t in self.tickets)


class ContinuousLoop:
    """One replica's worker loop in continuous mode (`batching = "continuous"`)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.running: list[Cohort] = []

    def run(self) -> None:
        """Until the queue closes and the running cohorts finish."""
        queue = self.replica.admission.queue
        try:
            while True:
                budget = queue.memory_budget
                free_rows = queue.max_batch_size - sum(c.rows for c in self.running)
                free_bytes = None if budget is None else budget - sum(c.kv_bytes for c in self.running)
                taken = queue.take_admissible(free_rows, free_bytes, block=not self.running)
                if taken is None and not self.running:
                    return
                self._admit(taken or [])
                self._step_all()
        except BaseException:
            for cohort in self.running:  # the thread is going down: nobody else would answer them
                for t in cohort.tickets:
                    t.fail(generation_failed())
                self._finished(cohort)
            raise

    # ---- admission --------------------------------------------------------------------------
    def _admit(self, tickets: list[Ticket[GenerationRequest]]) -> None:
        live = [t for t in tickets if not t.cancelled]
        self.replica.admission.finished([t for t in tickets if t.cancelled])
        for key in dict.fromkeys(t.key for t in live):  # one cohort per schedule, in arrival order
            self._start([t for t in live if t.key == key])

    def _start(self, tickets: list[Ticket[GenerationRequest]]) -> None:
        replica, now = self.replica, time.monotonic()
        for t in tickets:
            replica.metrics.queue_wait.observe(now - t.enqueued)
        delivery = BatchDelivery(tickets, replica.pipeline, replica.metrics)
        try:
            if replica.fault_hook is not None:
                replica.fault_hook(delivery.requests)
            generation = replica.pipeline.start(
                delivery.prompts, delivery.requests[0].schedule, delivery.params, delivery.conditions
            )
        except Exception as e:
            log.exception("cohort of requests %s failed to start", [t.payload.request_id for t in tickets])
            self._recover(tickets, now, e)
            return
        replica.metrics.batch_size.observe(len(delivery.owners))
        replica.metrics.running_rows.inc(len(delivery.owners))
        self.running.append(Cohort(tickets, delivery, generation, now))

    # ---- one step: every cohort's next scale -----------------------------------------------
    def _step_all(self) -> None:
        for cohort in list(self.running):
            try:
                cohort.generation.step(functools.partial(self.replica.on_scale, cohort.delivery))
                if cohort.generation.done:
                    result = cohort.generation.finish()
            except Exception as e:
                log.exception("cohort of requests %s failed", [t.payload.request_id for t in cohort.tickets])
                self._drop(cohort)
                self._recover(cohort.tickets, cohort.started, e)
                continue
            if cohort.generation.done:
                self._complete(cohort, result)

    def _complete(self, cohort: Cohort, result: GenerationResult) -> None:
        self._drop(cohort)
        replica, seconds = self.replica, time.monotonic() - cohort.started
        replica.admission.times.record(replica.device, cohort.generation.schedule.key, seconds)
        replica.observe(result)
        cohort.delivery.deliver(result, cohort.started)
        self._finished(cohort)

    def _drop(self, cohort: Cohort) -> None:
        self.running.remove(cohort)
        self.replica.metrics.running_rows.dec(len(cohort.delivery.owners))

    def _finished(self, cohort: Cohort) -> None:
        self.replica.admission.finished(cohort.tickets)

    def _recover(self, tickets: Iterable[Ticket[GenerationRequest]], started: float, error: Exception) -> None:
        """A failed cohort: retried alone by the static path (halves until each request fails alone)."""
        tickets = list(tickets)
        reason: Failure = "out_of_memory" if isinstance(error, DeviceOutOfMemory) else "generation"
        ids = [t.payload.request_id for t in tickets]
        log.warning("cohort of requests %s failed (%s): retried apart from the others", ids, reason)
        try:
            self.replica.retry_apart(tickets, started, reason)
        finally:
            self.replica.admission.finished(tickets)
