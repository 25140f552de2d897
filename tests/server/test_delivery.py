"""server/delivery.py's BatchDelivery alone: rows to tickets, previews to the requests that asked for
them, rows of cancelled requests dropped, and each request's images or its own error. A stand-in
pipeline makes the images (each filled with its row's index); one test runs the real tiny pipeline.
(Previews of requests sharing a batch through the API: test_shared_batch_previews.py.)"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch

from model.config import SamplingParams
from model.pipeline import GenerationResult, StageTimings
from model.sampler import ScaleEvent
from model.schedules import ScaleSchedule
from server.batcher import Ticket
from server.delivery import BatchDelivery
from server.errors import ServingError
from server.jobs import GenerationOutput, GenerationRequest, Preview
from server.metrics import Metrics, ModelMetrics

SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))
SIZE = (6, 4)  # (height, width) of the stand-in images


def _image(row: int) -> np.ndarray:
    return np.full((*SIZE, 3), row, dtype=np.uint8)


class PreviewPipeline:
    """What BatchDelivery asks of a pipeline: preview images of some rows at a scale."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def preview_images(self, event: ScaleEvent, rows) -> np.ndarray:
        self.calls.append((event.scale_index, list(rows)))
        return np.stack([_image(r) for r in rows if r in event.rows])


class Previews(list):
    def __call__(self, preview: Preview) -> None:
        self.append(preview)


def _ticket(name: str, n: int, preview_scales=(), on_preview=None, enqueued=10.0) -> Ticket[GenerationRequest]:
    params = tuple(SamplingParams(seed=100 + i) for i in range(n))
    request = GenerationRequest(
        name, f"prompt {name}", SCHEDULE, params, time.monotonic() + 60, frozenset(preview_scales), on_preview
    )
    return Ticket(SCHEDULE.key, n, 0, request.deadline, request, enqueued=enqueued)


def _event(scale: int, rows) -> ScaleEvent:
    return ScaleEvent(scale, SCHEDULE.num_scales, tuple(rows), torch.zeros(len(rows), 1, 1, 1), 0.01)


def _result(rows, nonfinite=()) -> GenerationResult:
    return GenerationResult(
        rows=tuple(rows),
        nonfinite=tuple(nonfinite),
        images=[_image(r) for r in rows],
        bits=[],
        seeds=[1000 + r for r in rows],
        prompt_tokens=[3 + r for r in rows],
        image_tokens=21 * 8,
        timings=StageTimings(0.1, 0.2, 0.3, (0.05,) * 3),
    )


def _delivery(*tickets) -> tuple[BatchDelivery, PreviewPipeline, ModelMetrics]:
    pipeline, metrics = PreviewPipeline(), Metrics().for_model("m")
    return BatchDelivery(list(tickets), pipeline, metrics), pipeline, metrics


def test_each_row_belongs_to_its_ticket_in_order():
    a, b, c = _ticket("a", 2), _ticket("b", 1), _ticket("c", 3)
    delivery, _, _ = _delivery(a, b, c)
    assert delivery.owners == [0, 0, 1, 2, 2, 2]
    assert delivery.prompts == ["prompt a"] * 2 + ["prompt b"] + ["prompt c"] * 3
    assert [p.seed for p in delivery.params] == [100, 101, 100, 100, 101, 102]
    assert [delivery.rows_of(i) for i in range(3)] == [[0, 1], [2], [3, 4, 5]]


def test_previews_go_only_to_requests_that_asked_for_that_scale_with_only_their_rows():
    a_seen, b_seen = Previews(), Previews()
    a = _ticket("a", 2, preview_scales={1}, on_preview=a_seen)
    b = _ticket("b", 1, preview_scales={0, 1}, on_preview=b_seen)
    c = _ticket("c", 2, preview_scales={0, 1})  # asked, but no callback: nothing is decoded
    delivery, pipeline, _ = _delivery(a, b, c)
    assert delivery.on_scale(_event(0, range(5))) == set()
    assert pipeline.calls == [(0, [2])] and a_seen == []
    assert delivery.on_scale(_event(1, range(5))) == set()
    assert pipeline.calls[1:] == [(1, [0, 1]), (1, [2])]
    assert [(p.scale_index, p.num_scales) for p in b_seen] == [(0, 3), (1, 3)]
    assert [[int(img[0, 0, 0]) for img in p.images] for p in a_seen] == [[0, 1]]
    assert [[int(img[0, 0, 0]) for img in p.images] for p in b_seen] == [[2], [2]]
    delivery.on_scale(_event(2, range(5)))
    assert len(pipeline.calls) == 3  # nobody asked for scale 2


def test_rows_of_cancelled_requests_are_dropped_and_never_previewed():
    seen = Previews()
    a, b = _ticket("a", 2, preview_scales={0, 1}, on_preview=seen), _ticket("b", 2)
    delivery, pipeline, _ = _delivery(b, a)  # rows 0, 1: b; rows 2, 3: a
    a.cancel_reason = "disconnect"
    assert delivery.on_scale(_event(0, range(4))) == {2, 3}
    assert seen == [] and pipeline.calls == []
    assert delivery.on_scale(_event(1, (0, 1))) == set()  # already gone: nothing more to drop


def test_each_request_gets_its_own_rows_seeds_and_timings():
    a, b = _ticket("a", 2, enqueued=10.0), _ticket("b", 1, enqueued=11.5)
    delivery, _, _ = _delivery(a, b)
    delivery.deliver(_result((0, 1, 2)), started=12.0)
    out_a, out_b = a.future.result(0), b.future.result(0)
    assert isinstance(out_a, GenerationOutput) and out_a.schedule == SCHEDULE
    assert [int(img[0, 0, 0]) for img in out_a.images] == [0, 1] and out_a.seeds == [1000, 1001]
    assert [int(img[0, 0, 0]) for img in out_b.images] == [2] and out_b.seeds == [1002]
    assert (out_a.height, out_a.width) == SIZE and out_a.image_tokens == 21 * 8
    assert out_a.prompt_tokens == 3 and out_b.prompt_tokens == 5
    assert out_a.timings == {"queue_wait": 2.0, "text_encode": 0.1, "transformer": 0.2, "vae_decode": 0.3}
    assert out_b.timings["queue_wait"] == 0.5


def test_non_finite_rows_fail_only_their_own_request():
    a, b, c = _ticket("a", 1), _ticket("b", 2), _ticket("c", 1)
    delivery, _, metrics = _delivery(a, b, c)
    delivery.deliver(_result((0, 2, 3), nonfinite=(1,)), started=12.0)  # row 1 (b's first image) overflowed
    with pytest.raises(ServingError) as e:
        b.future.result(0)
    assert (e.value.status, e.value.code) == (422, "non_finite_logits")
    assert [int(img[0, 0, 0]) for img in a.future.result(0).images] == [0]
    assert [int(img[0, 0, 0]) for img in c.future.result(0).images] == [3]
    errors = metrics.owner.registry.get_sample_value
    assert errors("infinity_errors_total", {"model": "m", "reason": "non_finite_logits"}) == 1


def test_a_request_whose_rows_were_all_dropped_gets_the_cancelled_error():
    a, b = _ticket("a", 1), _ticket("b", 2)
    delivery, _, _ = _delivery(a, b)
    b.cancel_reason = "deadline"
    delivery.deliver(_result((0,)), started=12.0)  # rows 1, 2 left at a scale
    with pytest.raises(ServingError) as e:
        b.future.result(0)
    assert (e.value.status, e.value.code) == (499, "cancelled")
    assert len(a.future.result(0).images) == 1


def test_a_ticket_already_answered_is_left_alone():
    a, b = _ticket("a", 1), _ticket("b", 1)
    a.future.cancel()  # e.g. cancelled while its batch was taken
    delivery, _, _ = _delivery(a, b)
    delivery.deliver(_result((0, 1)), started=12.0)  # no InvalidStateError
    with pytest.raises(CancelledError):
        a.future.result(0)
    assert b.future.result(0).seeds == [1001]


def test_with_the_real_pipeline_a_request_cancelled_mid_run_leaves_at_the_next_scale(pipeline):
    """Previews of the real model reach the asking request; cancelling inside a scale callback drops the
    other request's rows before the next scale, and it gets the cancelled error while the first finishes."""
    seen = Previews()
    keep = _ticket("keep", 2, preview_scales={0, 2}, on_preview=seen)
    leave = _ticket("leave", 1)
    delivery = BatchDelivery([keep, leave], pipeline, Metrics().for_model("m"))
    events: list[ScaleEvent] = []

    def on_scale(event: ScaleEvent):
        events.append(event)
        if event.scale_index == 0:
            leave.cancel_reason = "disconnect"  # the client goes away during scale 0
        return delivery.on_scale(event)

    result = pipeline.generate(delivery.prompts, SCHEDULE, delivery.params, on_scale=on_scale)
    delivery.deliver(result, started=time.monotonic())
    assert [e.rows for e in events] == [(0, 1, 2), (0, 1), (0, 1)]
    height, width = pipeline.image_size(SCHEDULE)
    assert [len(p.images) for p in seen] == [2, 2]
    assert all(img.shape == (height, width, 3) and img.dtype == np.uint8 for p in seen for img in p.images)
    out = keep.future.result(0)
    assert len(out.images) == 2 and out.seeds == [100, 101] and (out.height, out.width) == (height, width)
    assert np.array_equal(seen[-1].images[1], pipeline.preview_images(events[-1], [1])[0])  # its own rows
    with pytest.raises(ServingError) as e:
        leave.future.result(0)
    assert e.value.code == "cancelled"
