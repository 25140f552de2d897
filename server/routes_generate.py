"""POST /generate: the native REST endpoint (image bytes, JSON, or server-sent events)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import ServerSentEvent

from model.image_condition import ImageCondition
from server.auth import GENERATION_GUARDS
from server.errors import ServingError, body_too_large, error_body, invalid
from server.images import CONTENT_TYPES, encode_image
from server.jobs import GenerationOutput, Preview
from server.models import ServedModel
from server.protocol import ERROR_RESPONSES, GeneratedImage, GenerateRequest, GenerateResponse, parse_aspect_ratio
from server.service import (
    PreviewMailbox,
    check_common,
    deadline_for,
    encode_b64,
    event_stream,
    input_h_div_w,
    over_text_body_limit,
    progress,
    read_condition,
    resolve_schedule,
    sampling_rows,
    sse,
    submit,
    wait_for_output,
)
from server.uploads import decode_base64

router = APIRouter(tags=["generate"])
QUEUE_UPDATE_S = 0.5  # while queued, a new `queued` event when the position changes


@router.post(
    "/generate",
    dependencies=GENERATION_GUARDS,
    response_model=GenerateResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}, "text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate `n` images. `Accept: image/*` with n=1 returns the image bytes; `stream` returns SSE.

    With `image` (and `mask`, `strength`, `paste`): image-to-image, docs/image-to-image.md."""
    app = request.app.state
    if body.image is None and over_text_body_limit(request):  # BodyLimit let it in for an image
        raise body_too_large(app.settings.max_body_bytes)
    check_common(request, body, body.n, has_image=body.image is not None)
    model = app.models.pick(body.model)
    condition = await _condition(request, body)
    h_div_w = parse_aspect_ratio(body.aspect_ratio) if body.aspect_ratio else None
    if h_div_w is None and body.width is None:
        h_div_w = input_h_div_w(condition)
    schedule = resolve_schedule(model.limits, body.width, body.height, h_div_w, body.pn)
    rows = sampling_rows(body, body.n, schedule)
    deadline = deadline_for(request, app.settings)
    if body.stream:
        previews = PreviewMailbox(model.engine.metrics.previews_dropped.inc)
        ticket = submit(
            request, model.engine, body.prompt, schedule, rows, deadline, previews, body.partial_images, condition
        )
        return event_stream(request, _events(request, body, model, ticket, previews, deadline))
    ticket = submit(request, model.engine, body.prompt, schedule, rows, deadline, condition=condition)
    out = await wait_for_output(request, model.engine, ticket, deadline)
    if body.n == 1 and _wants_image(request):
        data = await asyncio.to_thread(encode_image, out.images[0], body.output_format)
        return Response(data, media_type=CONTENT_TYPES[body.output_format], headers=_image_headers(out))
    return Response((await _response(request, body, model.name, out)).model_dump_json(), media_type="application/json")


async def _condition(request: Request, body: GenerateRequest) -> ImageCondition | None:
    """The input image of an image-to-image request (400 naming `image` or `mask` when unusable);
    None for text-to-image."""
    if body.image is None:
        if body.mask is not None:
            raise invalid("`mask` needs an `image` to edit", "mask")
        return None
    image = decode_base64(body.image, "image")
    mask = None if body.mask is None else decode_base64(body.mask, "mask")
    return await read_condition(request, image, mask, body)


def _wants_image(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/" in accept and "application/json" not in accept


def _image_headers(out: GenerationOutput) -> dict[str, str]:
    return {"x-seed": str(out.seeds[0]), "x-image-width": str(out.width), "x-image-height": str(out.height)}


async def _response(request: Request, body: GenerateRequest, model: str, out: GenerationOutput) -> GenerateResponse:
    images = [
        GeneratedImage(b64=await encode_b64(img, body.output_format), seed=seed)
        for img, seed in zip(out.images, out.seeds, strict=True)
    ]
    image_tokens = out.image_tokens * len(out.images)
    return GenerateResponse(
        id=request.state.request_id,
        created=int(time.time()),
        model=model,
        width=out.width,
        height=out.height,
        h_div_w=out.schedule.h_div_w,
        pn=out.schedule.pn,
        num_scales=out.schedule.num_scales,
        output_format=body.output_format,
        images=images,
        usage={
            "prompt_tokens": out.prompt_tokens,
            "image_tokens": image_tokens,
            "total_tokens": out.prompt_tokens + image_tokens,
        },
        timings=out.timings,
    )


async def _events(
    request: Request, body: GenerateRequest, model: ServedModel, ticket, previews: PreviewMailbox, deadline: float
) -> AsyncIterator[ServerSentEvent]:
    engine = model.engine
    start = time.monotonic()
    ahead = engine.images_ahead(ticket)
    yield sse({"id": request.state.request_id, "queue_depth": engine.queue_depth, "images_ahead": ahead}, "queued")
    # aclosing: when this stream ends early, progress() cancels the request now, not at garbage collection
    async with aclosing(progress(request, engine, ticket, previews, deadline, tick_s=QUEUE_UPDATE_S)) as items:
        async for item in items:
            if item is None:  # no news: has the queue moved?
                now = engine.images_ahead(ticket)
                if now is not None and now != ahead:
                    ahead = now
                    yield sse(
                        {"id": request.state.request_id, "queue_depth": engine.queue_depth, "images_ahead": ahead},
                        "queued",
                    )
            elif isinstance(item, Preview):
                images = [await encode_b64(img, "png") for img in item.images]
                yield sse(
                    {
                        "scale_index": item.scale_index,
                        "num_scales": item.num_scales,
                        "elapsed": round(time.monotonic() - start, 3),
                        "images": images,
                    },
                    "preview",
                )
            elif isinstance(item, ServingError):
                yield sse(error_body(item), "error")
            else:
                yield sse(json.loads((await _response(request, body, model.name, item)).model_dump_json()), "completed")
