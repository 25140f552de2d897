import threading
import time

import pytest

from server.batcher import Batcher, Ticket
from server.errors import ServingError


def ticket(key="a", rows=1, kv=1, deadline_s=60.0):
    return Ticket(key, rows, kv, time.monotonic() + deadline_s, payload=None)


def test_groups_by_schedule_in_arrival_order_up_to_the_batch_size():
    b = Batcher(max_batch_size=3, max_wait_s=0.0, max_queue_rows=100)
    t = [ticket("a"), ticket("b"), ticket("a", rows=2), ticket("a")]
    for x in t:
        b.put(x)
    assert b.take() == [t[0], t[2]]            # 3 rows of "a"; t[3] would exceed
    assert b.take() == [t[1]]                  # oldest remaining is "b"
    assert b.take() == [t[3]]
    assert b.depth == 0


def test_waits_up_to_max_wait_for_a_fuller_batch():
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100)     # a fresh batcher is patient
    first = ticket()
    b.put(first)
    later = ticket()
    threading.Timer(0.05, lambda: b.put(later)).start()
    start = time.monotonic()
    batch = b.take()
    waited = time.monotonic() - start
    assert batch == [first, later] and 0.25 <= waited < 2.0


def test_after_a_lone_request_the_next_one_leaves_without_waiting():
    b = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue_rows=100)
    b.put(ticket())
    b.put(ticket())
    assert len(b.take()) == 2                  # concurrent load: the next batch may wait for company
    b.put(ticket())
    start = time.monotonic()
    assert len(b.take()) == 1 and time.monotonic() - start >= 0.25
    b.put(ticket())                            # the last batch was a lone request: no batching delay
    start = time.monotonic()
    assert len(b.take()) == 1 and time.monotonic() - start < 0.1


def test_a_full_batch_leaves_at_once():
    b = Batcher(max_batch_size=2, max_wait_s=30.0, max_queue_rows=100)
    b.put(ticket())
    b.put(ticket())
    start = time.monotonic()
    assert len(b.take()) == 2 and time.monotonic() - start < 1.0


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
    b = Batcher(max_batch_size=8, max_wait_s=0.0, max_queue_rows=100)
    expired, gone, alive = ticket(deadline_s=-1), ticket(), ticket()
    gone.cancel_reason = "disconnect"
    for x in (expired, gone, alive):
        b.put(x)
    assert b.take() == [alive]
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
