"""Request and response models of the HTTP API (validation at the edge, fields named in errors)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.config import GuidancePreset
from model.schedules import PixelBudget
from server.images import OutputFormat

Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
# Sampling bounds. Why these: official runs use cfg 3-4 and tau 0.5-1; beyond cfg 30 or below tau 0.01
# the logits are scaled by > 3000 and the bits are all but greedy, and far enough out they overflow
# float32 and become inf/NaN. The engine also isolates a row that still goes non-finite (422).
CFG_MIN, CFG_MAX = 0.0, 30.0
TAU_MIN, TAU_MAX = 0.01, 10.0
Cfg = Annotated[float, Field(ge=CFG_MIN, le=CFG_MAX)]
Tau = Annotated[float, Field(ge=TAU_MIN, le=TAU_MAX)]


class SamplingFields(BaseModel):
    """Knobs shared by both endpoints (on the OpenAI endpoint: through `extra_body`)."""

    model_config = ConfigDict(allow_inf_nan=False, str_max_length=100_000)

    negative_prompt: str | None = Field(None, max_length=10_000)
    seed: Seed | None = Field(None, description="seed of the first image; image i uses seed + i")
    cfg: Cfg | Annotated[list[Cfg], Field(min_length=1, max_length=16)] | None = Field(
        None, description=f"guidance scale in [{CFG_MIN:g}, {CFG_MAX:g}], one value or one per scale"
    )
    tau: Tau | Annotated[list[Tau], Field(min_length=1, max_length=16)] | None = Field(
        None, description=f"temperature in [{TAU_MIN:g}, {TAU_MAX:g}], one value or one per scale"
    )
    top_k: int | None = Field(None, ge=0, le=1000, description="1 = greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    guidance: GuidancePreset | None = Field(
        None, description='"full" (default): cfg on every scale; "skip-last": none on the last scale (faster)'
    )


class ImageFields(BaseModel):
    """Image-to-image knobs shared by /generate and the OpenAI edits and variations (docs/image-to-image.md)."""

    strength: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="0 = the input image (through the VAE), 1 = ignore it; default 1 with a mask, else 0.6",
    )
    paste: bool = Field(True, description="masked edits: the input's own pixels pasted back outside the mask")


# An image field's length is bounded by the body limit (max_image_body_bytes), not by the 100 000
# characters of SamplingFields' str_max_length.
_IMAGE_CHARS = 2**31


class GenerateRequest(SamplingFields, ImageFields):
    """POST /generate."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field("", description="required, except with an `image` (a variation without a prompt)")
    model: str | None = Field(None, description="the served model to use (GET /v1/models); default: the first")
    image: str | None = Field(
        None, max_length=_IMAGE_CHARS, description="image-to-image: the input image, base64 or a data URL"
    )
    mask: str | None = Field(
        None,
        max_length=_IMAGE_CHARS,
        description="with `image`: a PNG of its size, base64 or a data URL; fully transparent pixels = edit here",
    )
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)
    aspect_ratio: str | None = Field(None, description='width:height such as "16:9", or a number w/h')
    pn: PixelBudget | None = Field(None, description="pixel budget; default from the size or the server")
    n: int = Field(1, ge=1)
    output_format: OutputFormat = "png"
    stream: bool = Field(False, description="server-sent events: queued, preview per scale, completed")
    partial_images: int | None = Field(None, ge=0, le=16, description="with stream: previews (default: every scale)")

    @model_validator(mode="after")
    def _one_way_to_give_the_shape(self) -> GenerateRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        if self.width is not None and self.aspect_ratio is not None:
            raise ValueError("give either width/height or aspect_ratio, not both")
        return self

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str | None) -> str | None:
        if v is not None and parse_aspect_ratio(v) is None:
            raise ValueError('aspect_ratio must look like "16:9" or "1.5" (width / height, between 0.1 and 10)')
        return v


def parse_aspect_ratio(text: str) -> float | None:
    """ "16:9" or "1.777" (width / height) -> h / w, or None if malformed."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?::\s*(\d+(?:\.\d+)?)\s*)?", text)
    if m is None:
        return None
    w, h = float(m[1]), float(m[2]) if m[2] else 1.0
    if w <= 0 or h <= 0 or not 0.1 <= w / h <= 10:
        return None
    return h / w


class OpenAIImageRequest(SamplingFields):
    """POST /v1/images/generations. Unknown OpenAI fields (style, background, moderation...) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = Field("auto", description='"WIDTHxHEIGHT" (snapped to the nearest template) or "auto"')
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = "auto"
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = Field(None, max_length=256)
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and v != "auto" and parse_size(v) is None:
            raise ValueError('size must be "auto" or "WIDTHxHEIGHT" such as "1024x1024"')
        return v


class OpenAIEditRequest(OpenAIImageRequest, ImageFields):
    """The form fields of POST /v1/images/edits besides its files (`image`, `mask`)."""


class OpenAIVariationRequest(OpenAIEditRequest):
    """The form fields of POST /v1/images/variations besides its file (`image`)."""

    prompt: str = Field("", description="optional here (our extra): what the variation should show")


def parse_size(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text)
    if m is None or int(m[1]) == 0 or int(m[2]) == 0:
        return None
    return int(m[1]), int(m[2])


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    total_tokens: int


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    quality: str | None = None
    usage: Usage


class GeneratedImage(BaseModel):
    b64: str
    seed: int


class GenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    width: int
    height: int
    h_div_w: float
    pn: str
    num_scales: int
    output_format: OutputFormat
    images: list[GeneratedImage]
    usage: dict[str, int]
    timings: dict[str, float]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# The error statuses the generation endpoints document in the OpenAPI schema (both share them).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 500, 503, 504)
}
