"""Continuous batching (server/continuous.py) on the real tiny pipeline: a request joins the running ones
at the next scale boundary, leaves when its own last scale is done, and its image is the one it gets
alone or in a static batch. Requests are made to join mid-flight by events (a preview callback of the
running request submits the next one), never by timing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from model.config import SamplingParams
from model.schedules import ScaleSchedule
from server.engine import Engine, GenerationRequest, Ticket
from server.errors import ServingError
from server.metrics import Metrics

LONG = ScaleSchedule.official(1.0, "0.25M")  # 10 scales
SHORT = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))  # 3 scales


def _request(name, prompt, schedule, seeds=(0,), on_preview=None, preview_scales=()) -> GenerationRequest:
    params = tuple(SamplingParams(seed=s, cfg=3.0, tau=1.0) for s in seeds)
    return GenerationRequest(
        name,
        prompt,
        schedule,
        params,
        time.monotonic() + 60,
        preview_scales=frozenset(preview_scales),
        on_preview=on_preview,
    )


def _alone(pipeline, request: GenerationRequest) -> list[np.ndarray]:
    return pipeline.generate([request.prompt] * request.images, request.schedule, list(request.params)).images


class Started:
    """Fault hook that records which requests each cohort started with, and what was finished then."""

    def __init__(self) -> None:
        self.cohorts: list[tuple[list[str], set[str]]] = []
        self.finished: set[str] = set()
        self.fail: set[str] = set()

    def __call__(self, requests) -> None:
        names = [r.request_id for r in requests]
        self.cohorts.append((names, set(self.finished)))
        if self.fail & set(names):
            raise RuntimeError("injected failure")


@pytest.fixture()
def engine(pipeline):
    engine = Engine(
        {"cpu": pipeline}, Metrics().for_model("m"), max_batch_size=4, max_wait_ms=0, max_queue=8, batching="continuous"
    )
    engine.start()
    engine.fault_hook = hook = Started()
    yield engine, hook
    engine.fault_hook = None
    engine.drain(5)


def _submit(engine: Engine, hook: Started, request: GenerationRequest) -> Ticket:
    ticket = engine.submit(request)
    ticket.future.add_done_callback(lambda f: hook.finished.add(request.request_id))
    return ticket


def _join_at(scale: int, engine: Engine, hook: Started, joiners: list[GenerationRequest], tickets: list[Ticket]):
    """An on_preview callback (it runs on the worker, between two scales): at `scale`, submit `joiners`."""

    def on_preview(preview) -> None:
        if preview.scale_index == scale:
            tickets.extend(_submit(engine, hook, r) for r in joiners)

    return on_preview


def test_a_request_joins_mid_flight_leaves_first_and_gets_the_image_it_gets_alone(engine, pipeline):
    engine, hook = engine
    joined: list[Ticket] = []
    short = _request("short", "a green star", SHORT, seeds=(7, 8))
    long = _request("long", "a red circle", LONG, preview_scales={2})
    long.__dict__["on_preview"] = _join_at(2, engine, hook, [short], joined)  # frozen dataclass, set once
    running = _submit(engine, hook, long)
    out_long = running.future.result(60)
    out_short = joined[0].future.result(60)
    # joined while the long one ran (after its scale 2), and finished before it
    assert hook.cohorts == [(["long"], set()), (["short"], set())]
    assert out_short.timings["queue_wait"] < out_long.timings["transformer"]
    for out, request in ((out_long, long), (out_short, short)):
        alone = _alone(pipeline, request)
        assert all(np.array_equal(a, b) for a, b in zip(out.images, alone, strict=True))
    # and the short request's image is also the one it gets in a static batch with another
    static = pipeline.generate(
        ["a green star", "a green star", "two blue squares"],
        SHORT,
        [*short.params, SamplingParams(seed=1, cfg=3.0, tau=1.0)],
    )
    assert np.array_equal(out_short.images[0], static.images[0])


def test_rows_in_flight_stay_within_max_batch_size_in_arrival_order(engine, pipeline):
    engine, hook = engine
    joined: list[Ticket] = []
    big = _request("big", "two blue squares", SHORT, seeds=(1, 2, 3))  # 3 of the 4 rows
    small = _request("small", "a star", SHORT, seeds=(4,))
    long = _request("long", "a red circle", LONG, preview_scales={1})  # 1 row
    long.__dict__["on_preview"] = _join_at(1, engine, hook, [big, small], joined)
    running = _submit(engine, hook, long)
    running.future.result(60)
    for t in joined:
        t.future.result(60)
    # 1 (long) + 3 (big) fill the 4 rows; small (1 row) waited for a free row, never overtaking big
    assert [names for names, _ in hook.cohorts] == [["long"], ["big"], ["small"]]
    assert "big" in hook.cohorts[2][1]  # small started once big had finished


def test_a_request_cancelled_mid_flight_leaves_and_the_others_are_untouched(engine, pipeline):
    engine, hook = engine
    joined: list[Ticket] = []
    victim = _request("victim", "a green star", LONG, seeds=(3,), preview_scales={1})
    long = _request("long", "a red circle", LONG, preview_scales={1, 4})

    def on_preview(preview) -> None:
        if preview.scale_index == 1:
            joined.append(_submit(engine, hook, victim))

    def cancel_victim(preview) -> None:
        engine.cancel(joined[0], "client_gone")

    long.__dict__["on_preview"] = on_preview
    victim.__dict__["on_preview"] = cancel_victim
    out = _submit(engine, hook, long).future.result(60)
    with pytest.raises(ServingError) as e:
        joined[0].future.result(60)
    assert e.value.code == "cancelled"
    assert np.array_equal(out.images[0], _alone(pipeline, long)[0])


def test_a_failing_cohort_fails_alone_while_the_running_one_goes_on(engine, pipeline):
    engine, hook = engine
    joined: list[Ticket] = []
    hook.fail = {"bad"}
    bad = _request("bad", "a green star", SHORT)
    long = _request("long", "a red circle", LONG, preview_scales={1})
    long.__dict__["on_preview"] = _join_at(1, engine, hook, [bad], joined)
    out = _submit(engine, hook, long).future.result(60)
    with pytest.raises(ServingError) as e:
        joined[0].future.result(60)
    assert e.value.code == "generation_failed"
    assert np.array_equal(out.images[0], _alone(pipeline, long)[0])


def test_a_cohort_failing_mid_flight_is_retried_apart_and_the_others_finish(engine, pipeline, monkeypatch):
    """A step that raises (a bad row, a kernel error) takes its cohort out of the loop; the static
    path retries it apart (here it fails again, alone), and the running cohorts never notice."""
    engine, hook = engine
    start, joined = pipeline.start, []

    def start_with_a_bad_step(prompts, *args, **kwargs):
        generation = start(prompts, *args, **kwargs)
        if prompts[0] == "a green star":
            step, calls = generation.step, []

            def failing_step(on_scale=None):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("injected kernel failure")
                return step(on_scale)

            generation.step = failing_step
        return generation

    monkeypatch.setattr(pipeline, "start", start_with_a_bad_step)
    bad = _request("bad", "a green star", SHORT)
    long = _request("long", "a red circle", LONG, preview_scales={1})
    long.__dict__["on_preview"] = _join_at(1, engine, hook, [bad], joined)
    out = _submit(engine, hook, long).future.result(60)
    with pytest.raises(ServingError):
        joined[0].future.result(60)
    monkeypatch.undo()
    assert np.array_equal(out.images[0], _alone(pipeline, long)[0])
    assert engine.ready


def test_the_idle_worker_starts_a_lone_request_at_once_and_drains(pipeline):
    engine = Engine({"cpu": pipeline}, Metrics().for_model("m"), max_wait_ms=5000, batching="continuous")
    engine.start()
    try:
        t0 = time.monotonic()
        out = engine.submit(_request("lone", "a star", SHORT)).future.result(60)
        assert out.timings["queue_wait"] < 1.0  # no max_wait_ms wait for company: the next boundary is soon
        assert time.monotonic() - t0 < 5.0
        held = threading.Event()
        ticket = engine.submit(_request("last", "a star", LONG, preview_scales={0}, on_preview=lambda p: held.set()))
        assert held.wait(30)
    finally:
        assert engine.drain(30)  # the running request finishes before the worker stops
    assert ticket.future.result(0).images


def _merges(engine: Engine) -> float:
    return engine.metrics.owner.registry.get_sample_value("infinity_batch_merges_total", {"model": "m"})


@pytest.mark.parametrize("join_at, merges", [(2, 1), (8, 0)])
def test_a_request_of_the_same_schedule_catches_up_and_merges_early_but_not_late(engine, pipeline, join_at, merges):
    """Joined early (scale 2 of 10), the newcomer runs alone until it reaches the running request's
    scale, then both run as one batch; joined late (scale 8, past 2/3), they run apart. Either way
    each image is the one it gets alone."""
    engine, hook = engine
    joined: list[Ticket] = []
    newcomer = _request("newcomer", "two blue squares", LONG, seeds=(4, 5))
    first = _request("first", "a red circle", LONG, preview_scales={join_at})
    first.__dict__["on_preview"] = _join_at(join_at, engine, hook, [newcomer], joined)
    out_first = _submit(engine, hook, first).future.result(60)
    out_new = joined[0].future.result(60)
    assert _merges(engine) == merges
    for out, request in ((out_first, first), (out_new, newcomer)):
        assert all(np.array_equal(a, b) for a, b in zip(out.images, _alone(pipeline, request), strict=True))


def test_a_leader_waits_while_the_catch_up_costs_at_most_twice_its_remaining_scales():
    from types import SimpleNamespace

    from server.continuous import ContinuousLoop

    loop = ContinuousLoop(replica=None)  # type: ignore[arg-type]  # the policy reads only what it is given
    schedule = SimpleNamespace(num_scales=6)

    def leader(at: int):
        return SimpleNamespace(schedule_key="k", scale_index=at, generation=SimpleNamespace(schedule=schedule))

    # nothing measured yet: scales are counted (from 0 to s costs s, apart costs 2 (6 - s))
    assert loop._worth_waiting(leader(4), 0) and not loop._worth_waiting(leader(5), 0)
    # measured: the last scale costs as much as the first five together, so waiting there still pays
    loop._scale_seconds = {("k", k): cost for k, cost in enumerate([1, 1, 1, 1, 1, 3])}
    assert loop._worth_waiting(leader(5), 0)
    loop._scale_seconds[("k", 5)] = 2
    assert not loop._worth_waiting(leader(5), 0) and loop._worth_waiting(leader(5), 1)


def test_a_worker_death_fails_every_request_in_flight_and_leaves_none_waiting(engine):
    """A thread-killing error while a newcomer starts: the running request and the newcomer both fail
    (nothing else would answer them), and the restarted worker serves the next request."""
    from tests.server.test_engine import ThreadKill

    engine, hook = engine
    joined: list[Ticket] = []

    class Killer(Started):
        def __call__(self, requests) -> None:
            super().__call__(requests)
            if any(r.request_id == "newcomer" for r in requests):
                raise ThreadKill()

    engine.fault_hook = killer = Killer()
    newcomer = _request("newcomer", "a star", SHORT)
    first = _request("first", "a red circle", LONG, preview_scales={1})
    first.__dict__["on_preview"] = _join_at(1, engine, killer, [newcomer], joined)
    running = _submit(engine, killer, first)
    for ticket in (running, None):
        with pytest.raises(ServingError) as e:
            (ticket or joined[0]).future.result(30)
        assert e.value.code == "generation_failed"
    engine.fault_hook = hook
    assert engine.submit(_request("after", "a star", SHORT)).future.result(30).images


def test_each_request_of_a_finished_batch_is_delivered_before_the_next_ones_decode(engine, pipeline, monkeypatch):
    engine, hook = engine
    joined: list[Ticket] = []
    a = _request("a", "a green star", SHORT, seeds=(1,))
    b = _request("b", "two blue squares", SHORT, seeds=(2, 3))
    first = _request("first", "a red circle", LONG, preview_scales={0})
    first.__dict__["on_preview"] = _join_at(0, engine, hook, [a, b], joined)  # a and b: one cohort
    decode, seen = pipeline.decode_latent, []

    def recording_decode(latent):
        if joined and len(joined) == 2:
            seen.append((len(latent), joined[0].future.done()))
        return decode(latent)

    monkeypatch.setattr(pipeline, "decode_latent", recording_decode)
    _submit(engine, hook, first).future.result(60)
    out_a, out_b = (t.future.result(60) for t in joined)
    assert [names for names, _ in hook.cohorts] == [["first"], ["a", "b"]]
    # a's one image decoded and delivered, then b's two images decoded
    assert (1, False) in seen and (2, True) in seen
    assert np.array_equal(out_a.images[0], _alone(pipeline, a)[0])
