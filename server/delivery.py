"""Delivery: the rows of one running batch, back to the requests they came from.

A batch runs one row per image; `owners` maps each row to its ticket. While the batch runs,
previews go to the requests that asked for that scale, and rows of cancelled requests are dropped
at the next scale. At the end each request gets its images, or the one error that stopped it
(non-finite logits, cancelled, or every row dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from model.config import SamplingParams
from model.image_condition import ImageCondition
from model.pipeline import GenerationResult, InfinityPipeline, ScaleEvent
from server.batcher import Ticket
from server.errors import cancelled, nonfinite_sampling
from server.jobs import GenerationOutput, GenerationRequest, Preview
from server.metrics import ModelMetrics

log = logging.getLogger(__name__)


class BatchDelivery:
    def __init__(
        self, tickets: Sequence[Ticket[GenerationRequest]], pipeline: InfinityPipeline, metrics: ModelMetrics
    ) -> None:
        self.tickets, self.pipeline, self.metrics = list(tickets), pipeline, metrics
        self.requests = [t.payload for t in self.tickets]
        self.owners = [i for i, r in enumerate(self.requests) for _ in r.params]  # ticket index of each row

    def absorb(self, other: BatchDelivery) -> None:
        """`other`'s tickets join this batch's, its rows after these (as `Generation.absorb` numbers them)."""
        offset = len(self.tickets)
        self.tickets += other.tickets
        self.requests += other.requests
        self.owners += [offset + i for i in other.owners]

    @property
    def prompts(self) -> list[str]:
        return [self.requests[i].prompt for i in self.owners]

    @property
    def params(self) -> list[SamplingParams]:
        return [p for r in self.requests for p in r.params]

    @property
    def conditions(self) -> list[ImageCondition | None] | None:
        """Each row's input image, or None when no row has one (plain text-to-image)."""
        rows = [self.requests[i].condition for i in self.owners]
        return rows if any(c is not None for c in rows) else None

    def rows_of(self, ticket_index: int) -> list[int]:
        return [row for row, owner in enumerate(self.owners) if owner == ticket_index]

    def on_scale(self, event: ScaleEvent) -> set[int]:
        """Previews for the requests that asked for this scale; returns the rows to drop (cancelled)."""
        for i, (ticket, request) in enumerate(zip(self.tickets, self.requests, strict=True)):
            if ticket.cancelled or request.on_preview is None or event.scale_index not in request.preview_scales:
                continue
            images = self.pipeline.preview_images(event, self.rows_of(i))
            request.on_preview(Preview(event.scale_index, event.num_scales, list(images)))
        return {row for row in event.rows if self.tickets[self.owners[row]].cancelled}

    def deliver(
        self, result: GenerationResult, started: float | Sequence[float], only: Collection[int] | None = None
    ) -> None:
        """Each request its images, or the error that stopped it. `started`: when the batch started, or
        when each ticket did (continuous batching: tickets that joined later). `only`: these tickets
        (indices), from a result decoded for their rows alone (`Generation.finish(rows)`)."""
        starts = [started] * len(self.tickets) if isinstance(started, (int, float)) else list(started)
        for i, ticket in enumerate(self.tickets):
            if ticket.future.done() or (only is not None and i not in only):
                continue
            if any(self.owners[row] == i for row in result.nonfinite):
                log.warning("request %s: non-finite logits, failed alone", ticket.payload.request_id)
                self.metrics.errors("non_finite_logits").inc()
                ticket.fail(nonfinite_sampling())
                continue
            kept = [k for k, row in enumerate(result.rows) if self.owners[row] == i]
            if not kept:  # every image of it was dropped (cancelled)
                ticket.fail(cancelled())
                continue
            ticket.future.set_result(self._output(ticket, result, kept, starts[i]))

    @staticmethod
    def _output(
        ticket: Ticket[GenerationRequest], result: GenerationResult, kept: list[int], started: float
    ) -> GenerationOutput:
        height, width = result.images[kept[0]].shape[:2]
        t = result.timings
        timings = {
            "queue_wait": started - ticket.enqueued,
            "text_encode": t.text_encode,
            "transformer": t.transformer,
            "vae_decode": t.vae_decode,
        }
        if ticket.payload.condition is not None:
            timings["image_encode"] = t.image_encode  # the batch's input images into bits
        return GenerationOutput(
            schedule=ticket.payload.schedule,
            images=[result.images[k] for k in kept],
            seeds=[result.seeds[k] for k in kept],
            width=width,
            height=height,
            prompt_tokens=result.prompt_tokens[kept[0]],
            image_tokens=result.image_tokens,
            timings=timings,
        )
