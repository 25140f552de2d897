"""The dynamic batcher: a bounded queue that hands worker threads batches of one schedule.

A batch is the oldest waiting request plus every later request with the same scale schedule,
in arrival order, up to `max_batch_size` images and the KV-cache memory budget. It leaves when
full or when its oldest request has waited `max_wait_s` (monotonic clock). Requests past their
deadline or cancelled while queued are failed here and never run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

from server.errors import ServingError, cancelled, deadline_exceeded, draining, queue_full

P = TypeVar("P")

# "static": a batch runs all its scales before the queue is looked at again (`Batcher.take`);
# "continuous": waiting requests join the running ones at the next scale boundary (`take_admissible`,
# server/continuous.py).
BatchingMode = Literal["static", "continuous"]


@dataclass(eq=False)
class Ticket(Generic[P]):
    """One admitted request as the batcher sees it; the engine's request rides along as `payload`."""

    key: str  # scale-schedule key: only equal keys share a batch
    rows: int  # images
    kv_bytes: int  # KV cache bytes of all its rows
    deadline: float  # monotonic
    payload: P  # the engine's request (server.jobs.GenerationRequest)
    enqueued: float = 0.0  # the batcher's clock when `put` queued it
    future: Future = field(default_factory=Future)
    cancel_reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def fail(self, error: ServingError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_rows: int,
        memory_budget: int | None = None,
        on_change: Callable[[int], None] | None = None,
        on_take: Callable[[list[Ticket]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.max_queue_rows, self.memory_budget = max_queue_rows, memory_budget
        self._on_change = on_change or (lambda depth: None)
        # Called under the queue lock as a batch leaves, so that "queued or running" never has a gap.
        self._on_take = on_take or (lambda batch: None)
        self._clock = clock
        self._queue: list[Ticket] = []
        self._cond = threading.Condition()
        self._closed: ServingError | None = None  # once closed: what a late request is told
        self._last_batch_requests = 2  # start patient: the first burst is batched

    def now(self) -> float:
        """The batcher's clock (monotonic seconds; a test may pass its own)."""
        return self._clock()

    @property
    def depth(self) -> int:
        """Images waiting."""
        with self._cond:
            return sum(t.rows for t in self._queue)

    def images_ahead(self, ticket: Ticket) -> int | None:
        """Images queued before this ticket (its place in line); None once it has left the queue."""
        with self._cond:
            for i, t in enumerate(self._queue):
                if t is ticket:
                    return sum(q.rows for q in self._queue[:i])
            return None

    def put(self, ticket: Ticket, retry_after: float = 1.0) -> None:
        with self._cond:
            if self._closed is not None:  # raced a drain or the last worker's death
                raise replace(self._closed)  # a fresh exception per request (tracebacks)
            if sum(t.rows for t in self._queue) + ticket.rows > self.max_queue_rows:
                raise queue_full(retry_after)
            ticket.enqueued = self._clock()
            self._queue.append(ticket)
            self._changed()

    def remove(self, ticket: Ticket) -> bool:
        """Take a queued ticket out (client gone); False if it already left the queue."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._changed()
                return True
            return False

    def close(self, error: ServingError | None = None) -> None:
        """Admit nothing more (`put` raises `error`); workers take what is queued, then stop."""
        with self._cond:
            self._closed = self._closed or error or draining()
            self._cond.notify_all()

    def fail_all(self, error: ServingError) -> int:
        """Close and fail every queued ticket with `error` (also what later `put`s raise); returns how many."""
        with self._cond:
            self._closed = self._closed or error
            queued, self._queue = self._queue, []
            for t in queued:
                t.fail(error)
            self._changed()
            return len(queued)

    def take(self, idle_timeout: float | None = None) -> list[Ticket] | None:
        """Block until a batch is ready. None when closed and empty, [] after `idle_timeout`."""
        with self._cond:
            idle_deadline = None if idle_timeout is None else self._clock() + idle_timeout
            while True:
                batch, wait_s = self._ready()
                if batch is not None:
                    return batch
                if wait_s is None:  # nothing queued
                    if self._closed is not None:
                        return None
                    wait_s = None if idle_deadline is None else idle_deadline - self._clock()
                    if wait_s is not None and wait_s <= 0:
                        return []
                self._cond.wait(wait_s)

    def take_admissible(self, max_rows: int, max_bytes: int | None, block: bool) -> list[Ticket] | None:
        """Continuous batching: the queued tickets that fit beside the running work, oldest first, of any
        schedule, stopping at the first that does not fit (arrival order: a large request is never
        overtaken, so it cannot starve). `block`: wait for a first ticket (the engine is idle).
        None when closed and empty; [] when nothing fits or nothing is queued."""
        with self._cond:
            while True:
                self._discard_dead()
                taken: list[Ticket] = []
                rows = memory = 0
                for t in self._queue:
                    fits_memory = max_bytes is None or memory + t.kv_bytes <= max_bytes
                    if (rows + t.rows > max_rows or not fits_memory) and (taken or not block):
                        break  # (idle, the head always goes: admission let no ticket exceed a whole batch)
                    taken.append(t)
                    rows, memory = rows + t.rows, memory + t.kv_bytes
                if taken or not block or (self._closed is not None and not self._queue):
                    break
                self._cond.wait()
            if not taken:
                return None if self._closed is not None and not self._queue else []
            del self._queue[: len(taken)]
            self._last_batch_requests = len(taken)
            self._on_take(taken)
            self._changed()
            return taken

    def poll(self) -> list[Ticket] | None:
        """The batch that leaves now, taken off the queue, or None: `take` without blocking (tests with
        their own clock decide each moment themselves)."""
        with self._cond:
            return self._ready()[0]

    # ---- internals (lock held) ---------------------------------------------------------------
    def _ready(self) -> tuple[list[Ticket] | None, float | None]:
        """(the batch that leaves now, None) or (None, seconds until the head's batch may leave; None
        when nothing is queued)."""
        self._discard_dead()
        if not self._queue:
            return None, None
        batch, full = self._select()
        leave_at = self._queue[0].enqueued + self.max_wait_s
        now = self._clock()
        # Wait for a fuller batch only under concurrent load (the last batch held several
        # requests): a lone client gets no batching delay, concurrent clients get full batches.
        patient = self._last_batch_requests > 1
        if not (full or now >= leave_at or self._closed is not None or not patient):
            return None, leave_at - now
        for t in batch:
            self._queue.remove(t)
        self._last_batch_requests = len(batch)
        self._on_take(batch)
        self._changed()
        return batch, None

    def _select(self) -> tuple[list[Ticket], bool]:
        head = self._queue[0]
        batch, rows, memory = [head], head.rows, head.kv_bytes
        for t in self._queue[1:]:
            if t.key != head.key:
                continue
            fits_rows = rows + t.rows <= self.max_batch_size
            fits_memory = self.memory_budget is None or memory + t.kv_bytes <= self.memory_budget
            if not (fits_rows and fits_memory):
                return batch, True
            batch.append(t)
            rows, memory = rows + t.rows, memory + t.kv_bytes
        return batch, rows >= self.max_batch_size

    def _discard_dead(self) -> None:
        now = self._clock()
        dead = [t for t in self._queue if t.cancelled or t.deadline <= now]
        for t in dead:
            self._queue.remove(t)
            t.fail(cancelled() if t.cancelled else deadline_exceeded())
        if dead:
            self._changed()

    def _changed(self) -> None:
        self._on_change(sum(t.rows for t in self._queue))
        self._cond.notify_all()
