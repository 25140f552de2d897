"""server/admission.py alone (no model): the KV budget, deadline estimates from BatchTimes, the queue bound,
cancellation and idleness. The batcher runs on a test clock, so no test waits. (The same refusals through
the API on the real engine: test_admission.py.)"""

from __future__ import annotations

import pytest

from model.config import SamplingParams
from model.schedules import ScaleSchedule
from server.admission import EMA_WEIGHT, MAX_RETRY_AFTER_S, Admission, BatchTimes
from server.batcher import Batcher
from server.errors import ServingError
from server.jobs import GenerationRequest
from server.metrics import Metrics, ModelMetrics

SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2)))
OTHER = ScaleSchedule.custom(((1, 1), (3, 3)))
KV_PER_ROW = 100  # bytes of one cache row; a guided image needs two


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _kv(schedule: ScaleSchedule, guided: bool) -> int:
    return KV_PER_ROW * (2 if guided else 1)


def _admission(budget=None, max_batch=4, max_queue=16, replicas=1) -> tuple[Admission, Clock, ModelMetrics]:
    clock, metrics = Clock(), Metrics().for_model("m")
    admission: Admission | None = None
    queue = Batcher(max_batch, 0.0, max_queue, budget, clock=clock, on_take=lambda batch: admission.running(batch))
    admission = Admission(queue, metrics, replicas, _kv)
    return admission, clock, metrics


def _request(clock: Clock, n=1, deadline_in=60.0, cfg=3.0, schedule=SCHEDULE, name="r") -> GenerationRequest:
    params = tuple(SamplingParams(cfg=cfg, seed=i) for i in range(n))
    return GenerationRequest(name, "a prompt", schedule, params, clock.now + deadline_in)


def _count(metrics: ModelMetrics, name: str, **labels) -> float:
    value = metrics.owner.registry.get_sample_value(name, {"model": metrics.model, **labels})
    assert value is not None, f"no {name} {labels}"  # each model's series are exported from its start
    return value


# ---- the KV budget ----------------------------------------------------------------------------
def test_a_request_over_the_kv_budget_is_refused_naming_n():
    admission, clock, _ = _admission(budget=250)
    with pytest.raises(ServingError) as e:
        admission.admit(_request(clock, n=2))  # 2 guided images: 400 bytes
    err = e.value
    assert (err.status, err.param, err.code) == (400, "n", "invalid_value")
    assert "400" in err.message and "250" in err.message
    assert admission.queue.depth == 0
    ticket = admission.admit(_request(clock, n=1))  # 200 bytes fit
    assert ticket.kv_bytes == 200 and ticket.rows == 1 and admission.queue.depth == 1
    assert admission.admit(_request(clock, n=2, cfg=1.0)).kv_bytes == 200  # unguided: one row per image


def test_without_a_budget_any_size_is_admitted():
    admission, clock, _ = _admission(budget=None)
    assert admission.admit(_request(clock, n=4)).kv_bytes == 4 * 2 * KV_PER_ROW


# ---- deadlines --------------------------------------------------------------------------------
def test_before_any_batch_time_only_a_passed_deadline_is_refused():
    admission, clock, metrics = _admission()
    assert admission.estimated_wait(SCHEDULE.key) == 0.0
    admission.admit(_request(clock, deadline_in=0.001))
    with pytest.raises(ServingError) as e:
        admission.admit(_request(clock, deadline_in=-1.0))
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "deadline_unreachable", 1.0)
    assert _count(metrics, "infinity_rejected_requests_total", reason="deadline") == 1


def test_a_deadline_the_recent_batch_times_cannot_meet_is_refused():
    admission, clock, metrics = _admission()
    admission.times.record("cpu", SCHEDULE.key, 2.0)
    assert admission.estimated_wait(SCHEDULE.key) == 2.0  # empty queue: one batch
    with pytest.raises(ServingError) as e:
        admission.admit(_request(clock, deadline_in=1.5))
    assert e.value.code == "deadline_unreachable" and e.value.retry_after == 2.0
    admission.admit(_request(clock, deadline_in=2.5))
    assert admission.estimated_wait(OTHER.key) == 0.0  # another schedule: unknown yet
    assert _count(metrics, "infinity_rejected_requests_total", reason="deadline") == 1


@pytest.mark.parametrize("replicas,expected", [(1, 2 * 3.0), (2, 1.5 * 3.0)])
def test_the_estimate_counts_the_batches_queued_ahead_over_all_replicas(replicas, expected):
    admission, clock, _ = _admission(max_batch=4, replicas=replicas)
    admission.times.record("cpu", SCHEDULE.key, 3.0)
    admission.admit(_request(clock, n=4, deadline_in=100))  # 4 images = one full batch ahead
    assert admission.estimated_wait(SCHEDULE.key) == pytest.approx(expected)


@pytest.mark.parametrize("batch_seconds,retry_after", [(0.2, 1.0), (500.0, MAX_RETRY_AFTER_S)])
def test_retry_after_stays_between_1_and_60_seconds(batch_seconds, retry_after):
    admission, clock, _ = _admission()
    admission.times.record("cpu", SCHEDULE.key, batch_seconds)
    with pytest.raises(ServingError) as e:
        admission.admit(_request(clock, deadline_in=0.1 if batch_seconds < 1 else 100))
    assert e.value.retry_after == retry_after


# ---- the queue bound --------------------------------------------------------------------------
def test_a_full_queue_refuses_with_429_and_counts_it():
    admission, clock, metrics = _admission(max_queue=3)
    admission.admit(_request(clock, n=2))
    with pytest.raises(ServingError) as e:
        admission.admit(_request(clock, n=2))
    assert (e.value.status, e.value.code, e.value.retry_after) == (429, "queue_full", 1.0)
    assert _count(metrics, "infinity_rejected_requests_total", reason="queue_full") == 1
    assert admission.queue.depth == 2
    admission.admit(_request(clock, n=1))  # what still fits is admitted


# ---- cancel and idle --------------------------------------------------------------------------
def test_cancel_takes_a_queued_ticket_out_once():
    admission, clock, metrics = _admission()
    ticket = admission.admit(_request(clock))
    admission.cancel(ticket, "disconnect")
    assert admission.queue.depth == 0 and ticket.future.cancelled() and ticket.cancel_reason == "disconnect"
    admission.cancel(ticket, "deadline")  # idempotent
    assert ticket.cancel_reason == "disconnect"
    assert _count(metrics, "infinity_cancelled_requests_total", stage="queued") == 1
    assert admission.idle


def test_cancel_marks_a_running_ticket_which_stays_running_until_finished():
    admission, clock, metrics = _admission()
    ticket = admission.admit(_request(clock))
    assert not admission.idle
    batch = admission.queue.poll()  # a worker takes it
    assert batch == [ticket] and admission.queue.depth == 0
    assert not admission.idle  # running counts as busy
    admission.cancel(ticket, "deadline")
    assert ticket.cancelled and not ticket.future.done()  # the worker drops it at the next scale
    assert _count(metrics, "infinity_cancelled_requests_total", stage="running") == 1
    admission.finished(batch)
    assert admission.idle


def test_cancelling_a_finished_request_does_nothing():
    admission, clock, metrics = _admission()
    ticket = admission.admit(_request(clock))
    admission.finished(admission.queue.poll())
    ticket.future.set_result("done")
    admission.cancel(ticket, "disconnect")
    assert not ticket.cancelled
    assert _count(metrics, "infinity_cancelled_requests_total", stage="running") == 0


# ---- BatchTimes -------------------------------------------------------------------------------
def test_batch_times_are_an_exponential_moving_average_per_device_and_schedule():
    times = BatchTimes()
    assert times.fastest("a") is None
    times.record("cpu", "a", 10.0)
    assert times.fastest("a") == 10.0  # the first time is taken as is
    times.record("cpu", "a", 20.0)
    assert times.fastest("a") == pytest.approx((1 - EMA_WEIGHT) * 10.0 + EMA_WEIGHT * 20.0)
    assert EMA_WEIGHT == 0.3
    times.record("cpu", "b", 1.0)
    assert times.fastest("a") == pytest.approx(13.0)  # other schedules apart


def test_fastest_is_the_quickest_replica_for_that_schedule():
    times = BatchTimes()
    times.record("cuda:0", "a", 4.0)
    times.record("cuda:1", "a", 3.0)
    times.record("cuda:1", "b", 0.5)
    assert times.fastest("a") == 3.0 and times.fastest("b") == 0.5
