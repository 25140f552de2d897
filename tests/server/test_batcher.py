import threading
import time

import pytest

from server.batcher import Batcher, Ticket
from server.errors import ServingError


class Clock:
    """The batcher's clock in a test: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.read_elsewhere = threading.Event()         # read by a thread other than the test's own
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
    assert b.take() == [t[0], t[2]]            # 3 rows of "a"; t[3] would exceed
    assert b.take() == [t[1]]                  # oldest remaining is "b"
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
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)   # a fresh batcher is patient
    first, later = ticket(clock=clock), ticket(clock=clock)
    b.put(first)
    assert b.poll() is None                    # alone and not full: it waits for company
    clock.advance(0.05)
    b.put(later)
    clock.advance(0.2499)
    assert b.poll() is None                    # still short of the first one's max_wait
    clock.advance(0.0001)
    assert b.poll() == [first, later]          # leaves when the oldest has waited max_wait_s


def test_take_waits_for_the_oldest_requests_max_wait():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    first = ticket(clock=clock)
    b.put(first)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(b.take()))
    taker.start()
    assert clock.read_elsewhere.wait(10)       # the taker holds the queue's lock: it decides, then waits
    later = ticket(clock=clock)
    b.put(later)                               # gets the lock once the taker waits; wakes it, still not due
    clock.advance(0.3)
    b.put(ticket("other", clock=clock))        # any change of the queue wakes it to look again
    taker.join(10)
    assert taken == [[first, later]]


def test_after_a_lone_request_the_next_one_leaves_without_waiting():
    clock = Clock()
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100, clock=clock)
    b.put(ticket(clock=clock))
    b.put(ticket(clock=clock))
    assert b.poll() is None
    clock.advance(0.3)
    assert len(b.poll()) == 2                  # concurrent load: the next batch may wait for company
    b.put(ticket(clock=clock))
    assert b.poll() is None
    clock.advance(0.3)
    assert len(b.poll()) == 1
    b.put(ticket(clock=clock))                 # the last batch was a lone request: no batching delay
    assert len(b.poll()) == 1


def test_a_full_batch_leaves_at_once():
    clock = Clock()
    b = Batcher(max_batch_size=2, max_wait_s=30.0, max_queue_rows=100, clock=clock)
    b.put(ticket(clock=clock))
    b.put(ticket(clock=clock))
    assert len(b.poll()) == 2                  # the clock has not moved


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
    clock.advance(1)                           # the first one's deadline, by the batcher's clock
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
        b.put(ticket())                            # would otherwise wait, unserved, until its deadline
    assert caught.value.status == 503 and caught.value.code == "draining"
    broken = Batcher(max_batch_size=4, max_wait_s=0.0, max_queue_rows=100)
    queued = ticket()
    broken.put(queued)
    from server.errors import not_ready

    assert broken.fail_all(not_ready()) == 1 and queued.future.exception().code == "not_ready"
    with pytest.raises(ServingError) as caught:
        broken.put(ticket())
    assert caught.value.code == "not_ready"
