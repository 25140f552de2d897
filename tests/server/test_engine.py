"""server/engine.py's lifecycle on the real tiny pipeline, without the HTTP layer: start and readiness,
stop_admitting, begin_drain, wait_idle, drain, and broken once every replica retired. A gate in the
fault hook holds a batch inside its worker, so each state is reached by events, not by sleeping.
(The same states through the API: test_lifecycle.py, test_worker_faults.py, test_replicas_api.py.)"""

from __future__ import annotations

import time

import pytest

from model.config import SamplingParams
from model.schedules import ScaleSchedule
from server.engine import Engine, GenerationOutput, GenerationRequest
from server.errors import ServingError
from server.metrics import Metrics
from tests.server.conftest import Gate, wait_until

SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))


def _request(name: str, n: int = 1) -> GenerationRequest:
    params = tuple(SamplingParams(seed=i) for i in range(n))
    return GenerationRequest(name, "a red circle", SCHEDULE, params, time.monotonic() + 60)


def _error(call) -> ServingError:
    with pytest.raises(ServingError) as e:
        call()
    return e.value


class ThreadKill(BaseException):
    """Escapes every `except Exception`: what a fatal error inside the worker looks like."""


@pytest.fixture()
def engine(pipeline):
    engine = Engine({"cpu": pipeline}, Metrics().for_model("m"), max_batch_size=4, max_wait_ms=0, max_queue=8)
    yield engine
    engine.fault_hook = None
    engine.drain(5)


@pytest.fixture()
def held(engine):
    """A started engine whose next batch waits in its worker until `gate.opened` is set."""
    engine.start()
    gate = Gate()
    engine.fault_hook = gate
    gate.close()
    yield engine, gate
    gate.opened.set()


def _hold_one_running(engine: Engine, gate: Gate):
    running = engine.submit(_request("running"))
    assert gate.entered.wait(10)
    return running


def test_not_ready_until_started_then_serves_after_a_warm_up(engine, pipeline, monkeypatch):
    assert not engine.ready and not engine.broken
    assert _error(lambda: engine.submit(_request("early"))).code == "not_ready"
    generate, warmed = pipeline.generate, []

    def slow_warm_up(prompts, *args, **kwargs):
        out = generate(prompts, *args, **kwargs)
        if prompts[0] == "warm-up":
            time.sleep(0.05)  # a slow first compile, say
            warmed.append(len(prompts))
        return out

    monkeypatch.setattr(pipeline, "generate", slow_warm_up)
    engine.start(warmup=SCHEDULE, warmup_batches=(1, 2))
    assert warmed == [1, 2]  # start returned after the whole warm-up
    assert engine.ready and engine.metrics.owner.registry.get_sample_value("infinity_ready", {"model": "m"}) == 1
    out = engine.submit(_request("a", n=2)).future.result(30)
    assert isinstance(out, GenerationOutput) and out.schedule == SCHEDULE and out.seeds == [0, 1]
    height, width = engine.image_size(SCHEDULE)
    assert (height, width) == pipeline.image_size(SCHEDULE)
    assert [img.shape for img in out.images] == [(height, width, 3)] * 2 and (out.height, out.width) == (height, width)


def test_the_fault_hook_reaches_every_replica(engine):
    hook = Gate()
    engine.fault_hook = hook
    assert engine.fault_hook is hook and all(r.fault_hook is hook for r in engine.replicas)


def test_queue_depth_places_in_line_and_cancel(held):
    engine, gate = held
    running = _hold_one_running(engine, gate)
    second, third = engine.submit(_request("second", n=2)), engine.submit(_request("third"))
    assert engine.queue_depth == 3
    assert engine.images_ahead(second) == 0 and engine.images_ahead(third) == 2
    assert engine.images_ahead(running) is None  # it left the queue
    engine.cancel(second, "disconnect")
    assert second.future.cancelled() and engine.queue_depth == 1 and engine.images_ahead(third) == 0
    gate.opened.set()
    assert running.future.result(30) and third.future.result(30)


def test_stop_admitting_refuses_new_requests_and_finishes_the_rest(held):
    engine, gate = held
    running = _hold_one_running(engine, gate)
    queued = engine.submit(_request("queued"))
    engine.stop_admitting()
    assert not engine.ready and engine.metrics.owner.registry.get_sample_value("infinity_ready", {"model": "m"}) == 0
    error = _error(lambda: engine.submit(_request("late")))
    assert (error.status, error.code) == (503, "draining")
    gate.opened.set()
    assert running.future.result(30) and queued.future.result(30)


def test_begin_drain_fails_what_is_queued_with_503_and_counts_it(held):
    engine, gate = held
    running = _hold_one_running(engine, gate)
    queued = [engine.submit(_request(f"queued-{i}")) for i in range(2)]
    assert engine.begin_drain(time.monotonic() + 10) == 2
    for ticket in queued:
        error = _error(lambda t=ticket: t.future.result(0))
        assert (error.status, error.code) == (503, "draining") and error.retry_after
    assert engine.queue_depth == 0 and not engine.ready
    assert _error(lambda: engine.submit(_request("late"))).code == "draining"
    assert not engine.wait_idle(0.05)  # the held batch still runs
    gate.opened.set()
    assert engine.wait_idle(30)
    assert running.future.result(0).images  # running work finished


def test_drain_waits_for_running_work_and_stops_the_workers(held):
    engine, gate = held
    running = _hold_one_running(engine, gate)
    gate.opened.set()
    assert engine.drain(30)
    assert running.future.result(0).images
    assert not any(r.alive for r in engine.replicas)
    assert _error(lambda: engine.batcher.put(None)).code == "draining"  # the queue is closed


def test_drain_reports_running_work_it_could_not_wait_for(held):
    engine, gate = held
    running = _hold_one_running(engine, gate)
    assert not engine.drain(0.05)
    gate.opened.set()
    assert running.future.result(30).images  # the worker still answers it


def test_broken_once_every_replica_retired(pipeline):
    engine = Engine(
        {"cpu": pipeline}, Metrics().for_model("m"), max_batch_size=4, max_wait_ms=0, max_queue=8, worker_restarts=0
    )
    try:
        engine.start()

        def die(requests):
            raise ThreadKill()

        engine.fault_hook = die
        assert _error(lambda: engine.submit(_request("fatal")).future.result(30)).code == "generation_failed"
        assert wait_until(lambda: engine.broken)
        assert not engine.ready and not engine.replicas[0].alive
        assert _error(lambda: engine.submit(_request("after"))).code == "not_ready"
        assert engine.metrics.owner.registry.get_sample_value("infinity_ready", {"model": "m"}) == 0
    finally:
        engine.drain(2)
