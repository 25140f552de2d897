"""OpenAI-compatible images API: POST /v1/images/generations, /edits and /variations (multipart), and
the served `url` images. All three share one path (`_images`): size, quality, n, stream and partial
images mean the same everywhere; only the stream's event names differ (`image_edit.*` with an input)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sse_starlette import ServerSentEvent

from model.image_condition import ImageCondition
from model.schedules import LARGEST_PN
from server.auth import GENERATION_GUARDS
from server.engine import Engine
from server.errors import ServingError, error_body, invalid
from server.forms import form_schema, one_file, optional_file, read_form
from server.images import CONTENT_TYPES, OutputFormat, encode_image
from server.jobs import GenerationOutput, Preview
from server.protocol import (
    ERROR_RESPONSES,
    ErrorResponse,
    ImageData,
    OpenAIEditRequest,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    OpenAIVariationRequest,
    Usage,
    parse_size,
)
from server.service import (
    PreviewMailbox,
    check_common,
    deadline_for,
    encode_b64,
    event_stream,
    input_h_div_w,
    progress,
    read_condition,
    resolve_schedule,
    sampling_rows,
    sse,
    submit,
    wait_for_output,
)

router = APIRouter(tags=["openai"])
EventKind = Literal["image_generation", "image_edit"]  # a stream's event names: f"{kind}.partial_image", ...
QUALITY_PN = {"low": "0.25M", "medium": "0.60M", "standard": "0.60M"}  # others: the server default


# JSON, or server-sent events with `stream`; errors in the project's one body (server/errors.py).
IMAGES_RESPONSES = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}


@router.post(
    "/v1/images/generations",
    dependencies=GENERATION_GUARDS,
    response_model=OpenAIImagesResponse,
    responses=IMAGES_RESPONSES,
)
async def images_generations(body: OpenAIImageRequest, request: Request) -> Response:
    check_common(request, body, body.n or 1)
    return await _images(request, body, None, "image_generation")


@router.post(
    "/v1/images/edits",
    dependencies=GENERATION_GUARDS,
    response_model=OpenAIImagesResponse,
    responses=IMAGES_RESPONSES,
    openapi_extra=form_schema(OpenAIEditRequest, required=("image",), optional=("mask",)),
)
async def images_edits(request: Request) -> Response:
    """OpenAI's edits (multipart): `image`, `prompt`, and `mask`, a PNG of the image's size whose fully
    transparent pixels mark where to edit (without it, the image's own transparent pixels, if any)."""
    body, files = await read_form(request, OpenAIEditRequest)
    check_common(request, body, body.n or 1, has_image=True)
    request.app.state.models.pick(body.model)  # an unknown model: 404 before the upload is decoded
    image, mask = one_file(files, "image"), optional_file(files, "mask")
    condition = await read_condition(request, image, mask, body, alpha_as_mask=True)
    return await _images(request, body, condition, "image_edit")


@router.post(
    "/v1/images/variations",
    dependencies=GENERATION_GUARDS,
    response_model=OpenAIImagesResponse,
    responses=IMAGES_RESPONSES,
    openapi_extra=form_schema(OpenAIVariationRequest, required=("image",)),
)
async def images_variations(request: Request) -> Response:
    """OpenAI's variations (multipart): `image`, and an optional `prompt` (our extra). A stream sends
    the edits' events (OpenAI's variations have no stream)."""
    body, files = await read_form(request, OpenAIVariationRequest)
    if "mask" in files:
        raise invalid("`mask`: a variation takes no mask (POST /v1/images/edits does)", "mask")
    check_common(request, body, body.n or 1, has_image=True)
    request.app.state.models.pick(body.model)  # an unknown model: 404 before the upload is decoded
    condition = await read_condition(request, one_file(files, "image"), None, body)
    return await _images(request, body, condition, "image_edit")


async def _images(
    request: Request, body: OpenAIImageRequest, condition: ImageCondition | None, kind: EventKind
) -> Response:
    """The one path of all three endpoints, from the checked request to the response or the stream."""
    app = request.app.state
    model = app.models.pick(body.model)
    n = body.n or 1
    size = parse_size(body.size) if body.size and body.size != "auto" else None
    pn = None if size else _pn_for_quality(body.quality, model.limits)
    h_div_w = None if size else input_h_div_w(condition)  # "auto": an input image keeps its shape
    schedule = resolve_schedule(model.limits, size[0] if size else None, size[1] if size else None, h_div_w, pn)
    rows = sampling_rows(body, n, schedule)
    deadline = deadline_for(request, app.settings)
    if body.stream:
        previews = PreviewMailbox(model.engine.metrics.previews_dropped.inc)
        count = 0 if body.partial_images is None else body.partial_images  # OpenAI: none unless asked
        ticket = submit(request, model.engine, body.prompt, schedule, rows, deadline, previews, count, condition)
        events = _events(request, body, model.engine, ticket, previews, deadline, kind, condition is not None)
        return event_stream(request, events)
    ticket = submit(request, model.engine, body.prompt, schedule, rows, deadline, condition=condition)
    out = await wait_for_output(request, model.engine, ticket, deadline)
    response = await _response(request, body, out, condition is not None)
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


def _usage(out: GenerationOutput, image_input: bool) -> Usage:
    """Tokens as OpenAI counts them; an input image counts as the tokens the VAE encodes it into."""
    output = out.image_tokens * len(out.images)
    image = out.image_tokens if image_input else 0
    return Usage(
        input_tokens=out.prompt_tokens + image,
        input_tokens_details={"text_tokens": out.prompt_tokens, "image_tokens": image},
        output_tokens=output,
        total_tokens=out.prompt_tokens + image + output,
    )


async def _response(
    request: Request, body: OpenAIImageRequest, out: GenerationOutput, image_input: bool
) -> OpenAIImagesResponse:
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
        usage=_usage(out, image_input),
    )


def _event(data: dict) -> ServerSentEvent:
    return sse(data, data["type"])


async def _events(
    request: Request,
    body: OpenAIImageRequest,
    engine: Engine,
    ticket,
    previews: PreviewMailbox,
    deadline: float,
    kind: EventKind,
    image_input: bool,
) -> AsyncIterator[ServerSentEvent]:
    fmt = _fmt(body)
    common = {"background": "opaque", "output_format": fmt, "quality": body.quality or "auto"}
    index = 0
    # aclosing: when this stream ends early, progress() cancels the request now, not at garbage collection
    async with aclosing(progress(request, engine, ticket, previews, deadline)) as items:
        async for item in items:
            if isinstance(item, Preview):
                for image in item.images:
                    h, w = image.shape[:2]
                    yield _event(
                        {
                            "type": f"{kind}.partial_image",
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
                usage = _usage(item, image_input).model_dump()
                for image in item.images:
                    yield _event(
                        {
                            "type": f"{kind}.completed",
                            "created_at": int(time.time()),
                            "size": f"{item.width}x{item.height}",
                            "usage": usage,
                            "b64_json": await encode_b64(image, fmt, body.output_compression),
                            **common,
                        }
                    )
