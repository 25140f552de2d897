"""OpenAI-compatible images API: POST /v1/images/generations and the served `url` images."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import ServerSentEvent

from model.schedules import LARGEST_PN
from server.auth import GENERATION_GUARDS
from server.errors import ServingError, error_body
from server.images import CONTENT_TYPES, OutputFormat, encode_image
from server.jobs import GenerationOutput, Preview
from server.protocol import (
    ERROR_RESPONSES,
    ErrorResponse,
    ImageData,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    Usage,
    parse_size,
)
from server.service import (
    PreviewMailbox,
    check_common,
    deadline_for,
    encode_b64,
    event_stream,
    progress,
    resolve_schedule,
    sampling_rows,
    sse,
    submit,
    wait_for_output,
)

router = APIRouter(tags=["openai"])
QUALITY_PN = {"low": "0.25M", "medium": "0.60M", "standard": "0.60M"}  # others: the server default


@router.post(
    "/v1/images/generations",
    dependencies=GENERATION_GUARDS,
    response_model=OpenAIImagesResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def images_generations(body: OpenAIImageRequest, request: Request) -> Response:
    app = request.app.state
    n = body.n or 1
    check_common(request, body, n)
    size = parse_size(body.size) if body.size and body.size != "auto" else None
    pn = None if size else _pn_for_quality(body.quality, app.limits)
    schedule = resolve_schedule(app.limits, size[0] if size else None, size[1] if size else None, None, pn)
    rows = sampling_rows(body, n, schedule)
    deadline = deadline_for(request, app.settings)
    if body.stream:
        previews = PreviewMailbox(app.metrics.previews_dropped.inc)
        count = 0 if body.partial_images is None else body.partial_images  # OpenAI: none unless asked
        ticket = submit(request, body.prompt, schedule, rows, deadline, previews, count)
        return event_stream(request, _events(request, body, ticket, previews, deadline))
    ticket = submit(request, body.prompt, schedule, rows, deadline)
    out = await wait_for_output(request, app.engine, ticket, deadline)
    response = await _response(request, body, out)
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


@router.get("/v1/images/{image_id}", tags=["openai"], responses={404: {"model": ErrorResponse}})
async def stored_image(image_id: str, request: Request) -> Response:
    """Images of `response_format=url`, served for `url_ttl_s` seconds; ids are random, not paths."""
    stored = request.app.state.images.get(image_id)
    if stored is None:
        raise ServingError(
            "image not found or expired", 404, "invalid_request_error", "image_not_found", retryable=False
        )
    return Response(stored.data, media_type=stored.content_type, headers={"Cache-Control": "private, max-age=60"})


def _pn_for_quality(quality: str | None, limits) -> str:
    return QUALITY_PN.get(quality or "auto", limits.default_pn) if limits.max_pn == LARGEST_PN else limits.default_pn


def _fmt(body: OpenAIImageRequest) -> OutputFormat:
    return body.output_format or "png"


def _usage(out: GenerationOutput) -> Usage:
    output = out.image_tokens * len(out.images)
    return Usage(
        input_tokens=out.prompt_tokens,
        input_tokens_details={"text_tokens": out.prompt_tokens, "image_tokens": 0},
        output_tokens=output,
        total_tokens=out.prompt_tokens + output,
    )


async def _response(request: Request, body: OpenAIImageRequest, out: GenerationOutput) -> OpenAIImagesResponse:
    fmt, data = _fmt(body), []
    for image, seed in zip(out.images, out.seeds, strict=True):
        if body.response_format == "url":
            encoded = await asyncio.to_thread(encode_image, image, fmt, body.output_compression)
            image_id = request.app.state.images.put(encoded, CONTENT_TYPES[fmt])
            data.append(ImageData(url=str(request.url_for("stored_image", image_id=image_id)), seed=seed))
        else:
            data.append(ImageData(b64_json=await encode_b64(image, fmt, body.output_compression), seed=seed))
    return OpenAIImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=fmt,
        size=f"{out.width}x{out.height}",
        quality=body.quality,
        usage=_usage(out),
    )


def _event(data: dict) -> ServerSentEvent:
    return sse(data, data["type"])


async def _events(
    request: Request, body: OpenAIImageRequest, ticket, previews: PreviewMailbox, deadline: float
) -> AsyncIterator[ServerSentEvent]:
    fmt = _fmt(body)
    common = {"background": "opaque", "output_format": fmt, "quality": body.quality or "auto"}
    index = 0
    # aclosing: when this stream ends early, progress() cancels the request now, not at garbage collection
    async with aclosing(progress(request, request.app.state.engine, ticket, previews, deadline)) as items:
        async for item in items:
            if isinstance(item, Preview):
                for image in item.images:
                    h, w = image.shape[:2]
                    yield _event(
                        {
                            "type": "image_generation.partial_image",
                            "created_at": int(time.time()),
                            "size": f"{w}x{h}",
                            "partial_image_index": index,
                            "b64_json": await encode_b64(image, fmt, body.output_compression),
                            **common,
                        }
                    )
                index += 1
            elif isinstance(item, ServingError):  # no event name: the SDK reads a bare `error` field
                yield sse(error_body(item))
            elif item is not None:  # the output (None comes only with tick_s)
                usage = _usage(item).model_dump()
                for image in item.images:
                    yield _event(
                        {
                            "type": "image_generation.completed",
                            "created_at": int(time.time()),
                            "size": f"{item.width}x{item.height}",
                            "usage": usage,
                            "b64_json": await encode_b64(image, fmt, body.output_compression),
                            **common,
                        }
                    )
