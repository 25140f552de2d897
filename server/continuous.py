"""Continuous batching at scale boundaries: a request starts at the next scale, not after the batch.

The static batcher (server/batcher.py `take`) runs a batch's every scale before it looks at the queue
again. Here a replica's worker runs a loop of steps instead. At each scale boundary it admits the
queued requests that fit beside the running ones (arrival order, `max_batch_size` images and the KV
budget over everything in flight, the whole schedule's cache reserved at admission), as new cohorts
that begin at scale 0; then every due cohort runs its next scale; a cohort whose last scale is done is
decoded and delivered at once, without waiting for the others.

A cohort is the requests of one schedule admitted at one boundary: one `Generation` (model/pipeline.py)
with its own KV cache, text and generators. A cohort pauses while a later one of its schedule catches
up with it, when that is cheaper than running both apart (`_worth_waiting`); at the same scale the
two merge into one batch, whose rows then share every kernel call. Cohorts at different scales run one
after the other within a step. A row's numbers never depend on its batch-mates (batch invariance), so
a seed's image is the same alone, in a static batch, or joined mid-flight and merged
(tests/server/test_continuous.py).

Everything else is the static path's: previews and cancellation through the cohort's delivery at each
of its scales, the metrics, and failure isolation: a cohort that fails (out of memory or any error) is
retried alone, in halves, by the replica's static path, while the other cohorts wait one step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
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


def worth_waiting(scale_costs: Sequence[float], laggard_at: int, leader_at: int) -> bool:
    """The catch-up rule: a leader at `leader_at` waits for a laggard at `laggard_at` of its schedule
    while the laggard's catch-up (its scales laggard_at..leader_at-1) costs at most twice the leader's
    remaining scales. Pure, so that tests/bench/batching_sim.py simulates the very rule served."""
    return sum(scale_costs[laggard_at:leader_at]) <= 2 * sum(scale_costs[leader_at:])


@dataclass
class Cohort:
    """Requests of one schedule running together scale by scale: admitted at one boundary, joined by
    the later ones that caught up with them."""

    tickets: list[Ticket[GenerationRequest]]
    delivery: BatchDelivery
    generation: Generation
    started: list[float]  # monotonic, per ticket: its admission into the running set

    @property
    def scale_index(self) -> int:
        return self.generation.scale_index

    @property
    def schedule_key(self) -> str:
        return self.generation.schedule.key

    def absorb(self, other: Cohort) -> None:
        self.generation.absorb(other.generation)
        self.delivery.absorb(other.delivery)
        self.tickets += other.tickets
        self.started += other.started

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
        self._scale_seconds: dict[tuple[str, int], float] = {}  # (schedule, scale): recent step seconds
        self._held: dict[Ticket[GenerationRequest], None] = {}  # taken off the queue, not yet released

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
            # The thread is going down: nobody else would answer what it took, running or not yet
            # (a cohort starting, or one being retried apart, when the error struck).
            held = list(self._held)
            for t in held:
                t.fail(generation_failed())
            self._release(held)
            raise

    # ---- admission --------------------------------------------------------------------------
    def _admit(self, tickets: list[Ticket[GenerationRequest]]) -> None:
        self._held.update(dict.fromkeys(tickets))
        live = [t for t in tickets if not t.cancelled]
        self._release([t for t in tickets if t.cancelled])
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
        replica.metrics.running_batches.inc()
        self.running.append(Cohort(tickets, delivery, generation, [now] * len(tickets)))

    # ---- one step: the next scale of every cohort that is due ------------------------------
    def _step_all(self) -> None:
        self._merge_caught_up()
        for cohort in self._due():
            try:
                event = cohort.generation.step(functools.partial(self.replica.on_scale, cohort.delivery))
                self._observe_step(cohort, event.seconds)
                if cohort.generation.done:
                    self._complete(cohort)
            except Exception as e:
                log.exception("cohort of requests %s failed", [t.payload.request_id for t in cohort.tickets])
                if cohort in self.running:
                    self._drop(cohort)
                unanswered = [t for t in cohort.tickets if not t.future.done()]
                self._release([t for t in cohort.tickets if t.future.done()])
                self._recover(unanswered, min(cohort.started), e)

    def _complete(self, cohort: Cohort) -> None:
        """Decode and deliver request by request: each gets its images without waiting for the decode of
        its batch-mates' (one image per decode call either way)."""
        self._drop(cohort)
        generation, delivery = cohort.generation, cohort.delivery
        parts = []
        for i in range(len(delivery.tickets)):
            parts.append(generation.finish(delivery.rows_of(i)))
            delivery.deliver(parts[-1], cohort.started, only=(i,))
        replica, seconds = self.replica, time.monotonic() - min(cohort.started)
        replica.admission.times.record(replica.device, generation.schedule.key, seconds)
        replica.observe(GenerationResult.combine(parts))
        self._release(cohort.tickets)

    def _merge_caught_up(self) -> None:
        """Cohorts at the same scale of one schedule become one batch: from here their rows share
        every GEMM call and kernel launch (as a static batch's do) instead of running one after the
        other. Each row's numbers are its own (batch invariance), so no image changes."""
        for cohort in list(self.running):
            if cohort not in self.running:
                continue
            for later in [c for c in self.running if c is not cohort and cohort.generation.can_absorb(c.generation)]:
                if not self._merge_fits(cohort, later):
                    continue
                try:
                    cohort.absorb(later)
                except DeviceOutOfMemory:  # the batch is left as it was: they run apart
                    log.warning("out of device memory merging two running batches; they run apart")
                    continue
                self.running.remove(later)
                self.replica.metrics.running_batches.dec()
                self.replica.metrics.batch_merges.inc()

    def _merge_fits(self, cohort: Cohort, later: Cohort) -> bool:
        """The merged cache is allocated before the two old ones are freed: the budget must hold it too."""
        budget = self.replica.admission.queue.memory_budget
        if budget is None:
            return True
        held = sum(c.kv_bytes for c in self.running)
        return held + cohort.kv_bytes + later.kv_bytes <= budget

    def _due(self) -> list[Cohort]:
        """Cohorts that run their next scale now: all but those waiting for a later cohort of their
        schedule to catch up with them (`_worth_waiting`)."""
        due = []
        for cohort in self.running:
            laggards = [
                c.scale_index
                for c in self.running
                if c.schedule_key == cohort.schedule_key
                and c.scale_index < cohort.scale_index
                and c.generation.guided == cohort.generation.guided
            ]
            if not (laggards and self._worth_waiting(cohort, max(laggards))):
                due.append(cohort)
        return due

    def _worth_waiting(self, leader: Cohort, laggard_at: int) -> bool:
        """Wait (to merge) while the nearest laggard's catch-up, its scales laggard_at..s-1, costs at most
        twice the leader's remaining scales s..n-1. Why: waiting delays the leader by the catch-up and
        then both run as one batch; running apart costs each of the two about one extra step per
        remaining scale (a step's cost barely depends on its rows at the early, dispatch-bound scales).
        Costs are the recent seconds of each scale of this schedule (1 per scale until measured)."""
        key, n = leader.schedule_key, leader.generation.schedule.num_scales
        measured = [self._scale_seconds.get((key, k)) for k in range(n)]
        cost = [c for c in measured if c is not None]
        if len(cost) < n:  # not every scale run yet: count scales
            cost = [1.0] * n
        return worth_waiting(cost, laggard_at, leader.scale_index)

    def _observe_step(self, cohort: Cohort, seconds: float) -> None:
        key = (cohort.schedule_key, cohort.scale_index - 1)  # the scale just run
        previous = self._scale_seconds.get(key)
        self._scale_seconds[key] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _drop(self, cohort: Cohort) -> None:
        self.running.remove(cohort)
        self.replica.metrics.running_rows.dec(len(cohort.delivery.owners))
        self.replica.metrics.running_batches.dec()

    def _release(self, tickets: Iterable[Ticket[GenerationRequest]]) -> None:
        """The loop is done with these tickets (answered, or failed): no longer running."""
        tickets = list(tickets)
        for t in tickets:
            self._held.pop(t, None)
        self.replica.admission.finished(tickets)

    def _recover(self, tickets: Iterable[Ticket[GenerationRequest]], started: float, error: Exception) -> None:
        """A failed cohort: retried alone by the static path (halves until each request fails alone)."""
        tickets = list(tickets)
        reason: Failure = "out_of_memory" if isinstance(error, DeviceOutOfMemory) else "generation"
        ids = [t.payload.request_id for t in tickets]
        log.warning("cohort of requests %s failed (%s): retried apart from the others", ids, reason)
        self.replica.retry_apart(tickets, started, reason)  # a thread-killing error: run() fails them
        self._release(tickets)
