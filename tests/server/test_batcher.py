import threading
import time

import pytest

from server.batcher import Batcher, Ticket
from server.errors import ServingError


class Clock:
    """The batcher's clock in a test: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.read_elsewhere = threading.Event()  # read by a thread other than the test's own
        self._test_thread = threading.current_thread()

    def __call__(self) -> float:
        if threading.current_thread() is not self._test_thread:
            self.read_elsewhere.set()
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ticket(key="a", rows=1, kv=1, deadline_s=60.0, clock=time.monotonic):
    """A ticket whose deadline is `deadline_s` from now by `clock` (the batcher's)."""
    return Ticket(key, rows, kv, clock() + deadline_s, payload=None)


def test_groups_by_schedule_in_arrival_order_up_to_the_batch_size():
    b = Batcher(max_batch_size=3, max_wait_s=0.0, max_queue_rows=100)
    t = [ticket("a"), ticket("b"), ticket("a", rows=2), ticket("a")]
    for x in t:
        b.put(x)
    assert b.take() == [t[0], t[2]]  # 3 rows of "a"; t[3] would exceed
    assert b.take() == [t[1]]  # oldest remaining is "b"
    assert b.take() == [t[3]]
    assert b.depth == 0


def test_put_stamps_the_arrival_with_the_batchers_clock():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    clock.advance(5)
    first = ticket(clock=clock)
    b.put(first)
    assert first.enqueued == clock.now


def test_waits_up_to_max_wait_for_a_fuller_batch():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)  # a fresh batcher is patient
    first, later = ticket(clock=clock), ticket(clock=clock)
    b.put(first)
    assert b.poll() is None  # alone and not full: it waits for company
    clock.advance(0.05)
    b.put(later)
    clock.advance(0.2499)
    assert b.poll() is None  # still short of the first one's max_wait
    clock.advance(0.0001)
    assert b.poll() == [first, later]  # leaves when the oldest has waited max_wait_s


def test_take_waits_for_the_oldest_requests_max_wait():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    first = ticket(clock=clock)
    b.put(first)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(b.take()))
    taker.start()
    assert clock.read_elsewhere.wait(10)  # the taker holds the queue's lock: it decides, then waits
    later = ticket(clock=clock)
    b.put(later)  # gets the lock once the taker waits; wakes it, still not due
    clock.advance(0.3)
    b.put(ticket("other", clock=clock))  # any change of the queue wakes it to look again
    taker.join(10)
    assert taken == [[first, later]]


def test_after_a_lone_request_the_next_one_leaves_without_waiting():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    b.put(ticket(clock=clock))
    b.put(ticket(clock=clock))
    assert b.poll() is None
    clock.advance(0.3)
    assert len(b.poll()) == 2  # concurrent load: the next batch may wait for company
    b.put(ticket(clock=clock))
    assert b.poll() is None
    clock.advance(0.3)
    assert len(b.poll()) == 1
    b.put(ticket(clock=clock))  # the last batch was a lone request: no batching delay
    assert len(b.poll()) == 1


def test_a_full_batch_leaves_at_once():
    clock = Clock()
    b = Batcher(max_batch_size=2, max_wait_s=30.0, max_queue_rows=100, clock=clock)
    b.put(ticket(clock=clock))
    b.put(ticket(clock=clock))
    assert len(b.poll()) == 2  # the clock has not moved


def test_memory_budget_caps_the_batch():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100, memory_budget=250)
    for _ in range(3):
        b.put(ticket(kv=100))
    assert len(b.take()) == 2


def test_queue_bound_raises_429_with_retry_after():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=3)
    b.put(ticket(rows=2))
    with pytest.raises(ServingError) as err:
        b.put(ticket(rows=2), retry_after=7)
    assert err.value.status == 429 and err.value.retry_after == 7


def test_expired_and_cancelled_tickets_are_failed_not_run():
    clock = Clock()
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100, clock=clock)
    expired, gone, alive = ticket(deadline_s=1, clock=clock), ticket(clock=clock), ticket(clock=clock)
    gone.cancel_reason = "disconnect"
    for x in (expired, gone, alive):
        b.put(x)
    clock.advance(1)  # the first one's deadline, by the batcher's clock
    assert b.poll() == [alive]
    assert expired.future.exception().status == 504
    assert gone.future.exception().code == "cancelled"


def test_close_wakes_idle_workers():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100)
    threading.Timer(0.05, b.close).start()
    assert b.take() is None
    assert b.take(idle_timeout=0.01) is None


def test_depth_reports_changes():
    seen = []
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100, on_change=seen.append)
    t = ticket(rows=3)
    b.put(t)
    assert b.remove(t) and not b.remove(t)
    assert seen == [3, 0]


def test_a_request_that_races_the_close_fails_at_once_with_the_close_reason():
    b = Batcher(max_batch_size=4, max_wait_s=0.0, max_queue_rows=100)
    b.close()
    with pytest.raises(ServingError) as caught:
        b.put(ticket())  # would otherwise wait, unserved, until its deadline
    assert caught.value.status == 503 and caught.value.code == "draining"
    broken = Batcher(max_batch_size=4, max_wait_s=0.0, max_queue_rows=100)
    queued = ticket()
    broken.put(queued)
    from server.errors import not_ready

    assert broken.fail_all(not_ready()) == 1 and queued.future.exception().code == "not_ready"
    with pytest.raises(ServingError) as caught:
        broken.put(ticket())
    assert caught.value.code == "not_ready"


# ---- found by mutation testing (`make mutate`): the edges no test above looked at ------------


def waiting_on(clock: Clock, b: Batcher, step: float = 0.5) -> list[float]:
    """Make `b`'s condition waits move the test clock instead of sleeping (at most `step` per wait),
    so that how long `take` waits is exact and instant; returns the requested waits."""
    asked: list[float] = []

    def wait(timeout: float | None = None) -> bool:
        assert timeout is not None, "would block forever"
        asked.append(timeout)
        clock.advance(min(timeout, step))
        return False

    b._cond.wait = wait  # type: ignore[method-assign]
    return asked


def test_an_idle_take_returns_empty_after_exactly_its_timeout():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    start = clock.now
    waiting_on(clock, b)
    assert b.take(idle_timeout=5.0) == []
    assert clock.now - start == 5.0


def test_a_patient_batch_leaves_exactly_at_its_max_wait():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=3.0, max_queue_rows=100, clock=clock)
    first = ticket(clock=clock)
    b.put(first)
    asked = waiting_on(clock, b, step=1.0)
    assert b.take() == [first]
    assert clock.now - first.enqueued == 3.0 and asked == [3.0, 2.0, 1.0]


def test_a_batch_that_cannot_take_the_next_request_leaves_at_once():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=3.0, max_queue_rows=100, memory_budget=10, clock=clock)
    first, too_big = ticket(kv=6, clock=clock), ticket(kv=6, clock=clock)
    b.put(first), b.put(too_big)
    assert b.poll() == [first]  # full for the budget: no wait for company that cannot join


def test_requests_exactly_at_the_budget_and_the_queue_bound_fit():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=3, memory_budget=10)
    t = [ticket(kv=4), ticket(rows=2, kv=6)]
    for x in t:
        b.put(x)  # 3 rows: exactly the bound
    with pytest.raises(ServingError) as refused:
        b.put(ticket())
    assert refused.value.retry_after == 1.0  # the default when the caller names none
    assert b.take() == t  # 10 bytes: exactly the budget


def test_images_ahead_is_the_place_in_line_until_the_ticket_leaves():
    b = Batcher(max_batch_size=1, max_wait_s=0.0, max_queue_rows=100)
    t = [ticket(rows=2), ticket(rows=1), ticket(rows=1)]
    for x in t:
        b.put(x)
    assert [b.images_ahead(x) for x in t] == [0, 2, 3]
    b.take()
    assert [b.images_ahead(x) for x in t] == [None, 0, 1]


def test_on_take_sees_the_batch_as_it_leaves():
    seen: list[list[Ticket]] = []
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100, on_take=seen.append)
    t = [ticket(), ticket()]
    for x in t:
        b.put(x)
    assert b.take() == t and seen == [t]


def test_closed_and_empty_take_returns_none_and_put_raises_the_close_reason():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100)
    reason = ServingError("gone", 503, code="custom_reason")
    b.close(reason)
    assert b.take() is None
    with pytest.raises(ServingError) as refused:
        b.put(ticket())
    assert refused.value.code == "custom_reason"


# ---- continuous batching: take_admissible ----------------------------------------------------------
def test_admissible_takes_every_schedule_in_arrival_order_until_one_does_not_fit():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100)
    t = [ticket("a"), ticket("b", rows=2), ticket("a", rows=3), ticket("c")]
    for x in t:
        b.put(x)
    assert b.take_admissible(max_rows=3, max_bytes=None, block=False) == [t[0], t[1]]
    # t[2] needs 3 rows: t[3] (1 row) would fit beside the running work, but never overtakes it
    assert b.take_admissible(max_rows=2, max_bytes=None, block=False) == []
    assert b.take_admissible(max_rows=4, max_bytes=None, block=False) == [t[2], t[3]]
    assert b.depth == 0


def test_admissible_counts_the_kv_budget_left_beside_the_running_work():
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100, memory_budget=100)
    t = [ticket(kv=40), ticket(kv=40), ticket(kv=40)]
    for x in t:
        b.put(x)
    assert b.take_admissible(max_rows=8, max_bytes=90, block=False) == t[:2]
    assert b.take_admissible(max_rows=8, max_bytes=30, block=False) == []
    assert b.take_admissible(max_rows=8, max_bytes=40, block=False) == [t[2]]


def test_admissible_discards_the_dead_and_ends_once_closed_and_empty():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.0, max_queue_rows=100, clock=clock)
    late, alive = ticket(deadline_s=1, clock=clock), ticket(deadline_s=60, clock=clock)
    b.put(late)
    b.put(alive)
    clock.advance(2)
    assert b.take_admissible(max_rows=4, max_bytes=None, block=False) == [alive]
    with pytest.raises(ServingError) as e:
        late.future.result(0)
    assert e.value.code == "deadline_exceeded"
    b.close()
    assert b.take_admissible(max_rows=4, max_bytes=None, block=True) is None


def test_admissible_blocks_while_idle_until_a_ticket_arrives():
    b = Batcher(max_batch_size=4, max_wait_s=10.0, max_queue_rows=100)  # no waiting for company here
    got: list = []
    taker = threading.Thread(target=lambda: got.append(b.take_admissible(4, None, block=True)))
    taker.start()
    time.sleep(0.05)
    assert not got  # nothing queued: it waits
    t = ticket()
    b.put(t)
    taker.join(5)
    assert got == [[t]]
