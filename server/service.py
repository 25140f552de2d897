"""What both APIs share: turning request fields into an engine request, and waiting for it.

Waiting never blocks the event loop and never outlives the client: a disconnect or a passed
deadline cancels the request in the engine (out of the queue, or dropped at the next scale).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from model.config import SamplingParams, ScaleListError
from model.image_condition import ImageCondition
from model.schedules import PN_NAMES, ScaleSchedule, nearest_template, schedule_for_size
from server.batcher import Ticket
from server.engine import Engine
from server.errors import ServingError, cancelled, deadline_exceeded, invalid
from server.images import OutputFormat, encode_image
from server.jobs import GenerationOutput, GenerationRequest, Preview
from server.protocol import GenerateRequest, ImageFields, OpenAIImageRequest, SamplingFields
from server.settings import Settings
from server.uploads import image_condition

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class ModelLimits:
    """What the served model and the settings allow; decided once at start-up."""

    name: str
    default_pn: str
    max_pn: str
    fixed_schedule: ScaleSchedule | None = None  # a model trained for one schedule only (the default model)

    @property
    def warmup_schedule(self) -> ScaleSchedule:
        return self.fixed_schedule or ScaleSchedule.official(1.0, self.default_pn)


def resolve_schedule(
    limits: ModelLimits, width: int | None, height: int | None, h_div_w: float | None, pn: str | None
) -> ScaleSchedule:
    """Requested shape -> the nearest official template at an allowed pixel budget.

    A model trained for one schedule only always gets that schedule; the response says what was made.
    """
    if limits.fixed_schedule is not None:
        return limits.fixed_schedule
    if pn is not None and PN_NAMES.index(pn) > PN_NAMES.index(limits.max_pn):
        raise invalid(f"pn {pn} exceeds this server's limit {limits.max_pn}", "pn")
    if width is not None and height is not None:
        schedule = schedule_for_size(width, height, pn)
        if PN_NAMES.index(schedule.pn) > PN_NAMES.index(limits.max_pn):
            schedule = ScaleSchedule.official(schedule.h_div_w, limits.max_pn)
        return schedule
    template = nearest_template(h_div_w) if h_div_w is not None else 1.0
    return ScaleSchedule.official(template, pn or limits.default_pn)


def sampling_rows(fields: SamplingFields, n: int, schedule: ScaleSchedule) -> tuple[SamplingParams, ...]:
    """One SamplingParams per image: seed, seed + 1, ... (or random seeds), shared knobs.

    The server's one check of per-scale `cfg`/`tau` lists against the schedule, at the first point
    where both are known: a short list is a 400 naming its field. The rule and its message are the
    model's (`SamplingParams.check_scales`, which `InfinityPipeline.generate` applies for Python callers).
    """
    defaults = SamplingParams()

    def per_scale(name: str, value):
        if value is None:
            return getattr(defaults, name)
        return tuple(value) if isinstance(value, list) else float(value)

    shared = SamplingParams(
        cfg=per_scale("cfg", fields.cfg),
        tau=per_scale("tau", fields.tau),
        negative_prompt=fields.negative_prompt,
        top_k=defaults.top_k if fields.top_k is None else fields.top_k,
        top_p=defaults.top_p if fields.top_p is None else fields.top_p,
        guidance=defaults.guidance if fields.guidance is None else fields.guidance,
    )
    try:
        shared.check_scales(schedule.num_scales)
    except ScaleListError as e:
        raise invalid(str(e), e.param) from None
    first = fields.seed if fields.seed is not None else None
    rng = random.SystemRandom()
    return tuple(shared.with_seed((first + i) % 2**63 if first is not None else rng.randrange(2**32)) for i in range(n))


def check_common(request: Request, body: GenerateRequest | OpenAIImageRequest, n: int, has_image: bool = False) -> None:
    """Limits every endpoint shares. Bodies (prompts) are logged only when the operator opts in, and
    never their images. A prompt may be empty only beside an input image."""
    settings: Settings = request.app.state.settings
    if settings.log_requests_body:
        shown = body.model_dump_json(exclude_none=True, exclude={"image", "mask"})
        log.info("request %s body %s", request.state.request_id, shown)
    prompt: str = body.prompt
    if not prompt and not has_image:
        raise invalid("`prompt` is required (it may be empty only with an input `image`)", "prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise invalid(f"`prompt` must be at most {settings.max_prompt_chars} characters, got {len(prompt)}", "prompt")
    if n > settings.max_n:
        raise invalid(f"`n` must be between 1 and {settings.max_n}, got {n}", "n")


def over_text_body_limit(request: Request) -> bool:
    """The body is larger than a text-only request may be (BodyLimit let it in for its image)."""
    return getattr(request.state, "body_bytes", 0) > request.app.state.settings.max_body_bytes


async def read_condition(
    request: Request,
    image: bytes,
    mask: bytes | None,
    fields: ImageFields,
    alpha_as_mask: bool = False,
) -> ImageCondition:
    """Decode and check the input image (and mask) off the event loop; a 400 names the bad one."""
    settings: Settings = request.app.state.settings
    return await asyncio.to_thread(
        image_condition,
        image,
        mask,
        fields.strength,
        fields.paste,
        settings.max_image_pixels,
        alpha_as_mask=alpha_as_mask,
    )


def input_h_div_w(condition: ImageCondition | None) -> float | None:
    """The input image's shape (h / w): an image-to-image request without a size keeps it."""
    if condition is None:
        return None
    height, width = condition.image.shape[:2]
    return height / width


def deadline_for(request: Request, settings: Settings) -> float:
    """Server limit, shortened by the client's own read timeout when the OpenAI SDK announces it."""
    budget = settings.request_timeout_s
    header = request.headers.get("x-stainless-read-timeout")
    if header:
        try:
            client = float(header)
            if client > 0:
                budget = min(budget, client)
        except ValueError:
            pass
    return time.monotonic() + budget


def preview_scales(num_scales: int, count: int | None) -> frozenset[int]:
    """`count` scales spread before the last one; None = every scale but the last."""
    if count is None:
        return frozenset(range(num_scales - 1))
    return frozenset(round((i + 1) * (num_scales - 1) / (count + 1)) for i in range(count))


async def wait_for_output(request: Request, engine: Engine, ticket, deadline: float) -> GenerationOutput:
    """Await the engine without blocking the loop; cancel the ticket on disconnect, on deadline, and
    when this handler itself is cancelled (uvicorn's shutdown timeout), so no orphan keeps running."""
    future = asyncio.wrap_future(ticket.future)
    # When this handler is gone before the ticket ends, nobody reads its error: consume it here, or
    # asyncio logs "Future exception was never retrieved" for every cut stream.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                engine.cancel(ticket, "deadline")
                raise deadline_exceeded()
            done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_S, remaining))
            if done:
                if future.cancelled():
                    raise cancelled()
                return future.result()
            if await request.is_disconnected():
                engine.cancel(ticket, "disconnect")
                raise cancelled()
    except asyncio.CancelledError:
        engine.cancel(ticket, "shutdown")
        raise


async def encode_b64(pixels, fmt: OutputFormat, quality: int | None = None) -> str:
    data = await asyncio.to_thread(encode_image, pixels, fmt, quality)
    return base64.b64encode(data).decode("ascii")


class PreviewMailbox:
    """The newest unread Preview of one streaming request; a newer one replaces it (latest wins).

    Why: a reader slower than the scales, or one that stopped reading, then pins one preview (all
    images of one scale), not every preview of the request. Lives on the event loop; worker threads
    reach it through `preview_sink`.
    """

    def __init__(self, on_replace: Callable[[], object] | None = None) -> None:
        self._latest: Preview | None = None
        self._arrived = asyncio.Event()
        self._on_replace = on_replace
        self.replaced = 0  # previews dropped unread

    def put(self, preview: Preview) -> None:
        if self._latest is not None:
            self.replaced += 1
            if self._on_replace is not None:
                self._on_replace()
        self._latest = preview
        self._arrived.set()

    async def wait(self) -> None:
        """Until a preview is pending. It stays here (replaceable) until `take`."""
        await self._arrived.wait()

    def take(self) -> Preview | None:
        preview, self._latest = self._latest, None
        self._arrived.clear()
        return preview

    def __len__(self) -> int:
        return 0 if self._latest is None else 1


# What progress() yields: a preview, then the end (the output or the error); None: no news for tick_s.
Progress = Preview | GenerationOutput | ServingError | None


async def progress(
    request: Request, engine: Engine, ticket, previews: PreviewMailbox, deadline: float, tick_s: float | None = None
) -> AsyncGenerator[Progress, None]:
    """Yield each Preview as it arrives, then the GenerationOutput or the ServingError that ended it;
    with `tick_s`, also None after every `tick_s` seconds without news (to report the queue position).

    A preview is taken only when the consumer asks for the next item, so while the consumer is
    stuck (a client not reading) newer previews replace it in the mailbox instead of piling up.
    If the consumer stops early (client gone, send timed out), the request is cancelled in the engine.
    """
    waiter = asyncio.ensure_future(wait_for_output(request, engine, ticket, deadline))
    arrival: asyncio.Future | None = None
    try:
        while True:
            if arrival is None or arrival.done():
                arrival = asyncio.ensure_future(previews.wait())
            done, _ = await asyncio.wait({waiter, arrival}, timeout=tick_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None
                continue
            preview = previews.take()  # also the last one, when the output won the race
            if preview is not None:
                yield preview
            if waiter.done():
                try:
                    yield waiter.result()
                except ServingError as e:
                    yield e
                return
    finally:
        if not ticket.future.done():
            engine.cancel(ticket, "disconnect")
        waiter.cancel()
        if arrival is not None:
            arrival.cancel()


def preview_sink(previews: PreviewMailbox) -> Callable[[Preview], None]:
    """A callback for worker threads that hands previews to this event loop."""
    loop = asyncio.get_running_loop()

    def sink(preview: Preview) -> None:
        loop.call_soon_threadsafe(previews.put, preview)

    return sink


def submit(
    request: Request,
    engine: Engine,
    prompt: str,
    schedule: ScaleSchedule,
    rows: tuple[SamplingParams, ...],
    deadline: float,
    previews: PreviewMailbox | None = None,
    preview_count: int | None = None,
    condition: ImageCondition | None = None,
) -> Ticket[GenerationRequest]:
    """Hand one request to its model's engine; with `previews`, the previews of `preview_count` scales (None:
    every scale but the last) go to that mailbox; with `condition`, every image starts from that
    input image. Every endpoint submits through here."""
    scales, sink = frozenset[int](), None
    if previews is not None:
        scales, sink = preview_scales(schedule.num_scales, preview_count), preview_sink(previews)
    job = GenerationRequest(request.state.request_id, prompt, schedule, rows, deadline, scales, sink, condition)
    ticket = engine.submit(job)
    if condition is not None:
        engine.metrics.image_inputs("edit" if condition.mask is not None else "variation").inc()
    return ticket


SSE_SEP = "\n"  # LF, as before: the playground maps CRLF to LF per read, so a CRLF split across reads breaks it


def sse(data: dict, event: str | None = None) -> ServerSentEvent:
    """One event: an `event:` line (if named) and one `data:` line of JSON."""
    return ServerSentEvent(json.dumps(data), event=event, sep=SSE_SEP)


def event_stream(request: Request, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """Serve `events` as SSE, with a `: ping` comment every `stream_ping_s` (proxies cut connections idle
    for ~60 s, and a queued request or a long scale sends nothing) and a per-send timeout that ends the
    stream of a client that stopped reading."""
    settings: Settings = request.app.state.settings
    return _EventStream(
        events,
        ping=settings.stream_ping_s,
        send_timeout=settings.stream_send_timeout_s,
        sep=SSE_SEP,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SSE_SEP),
    )


class _EventStream(EventSourceResponse):
    """A client that stops reading is an expected end, not a server error: log it, do not raise it
    (the events generator is closed by then, which cancels its engine request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            rid = scope.get("state", {}).get("request_id")
            log.warning("request %s: the client read nothing for %gs; stream closed", rid, self.send_timeout)
