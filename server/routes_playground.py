"""The playground: a web page at `/` that generates through the streaming API and shows every scale.

The page is four static files in server/static (index.html, app.js, image.js, app.css: no build step,
nothing from a CDN) and one JSON document of what this server allows (templates with their
sizes, pixel budgets, limits, defaults), so the page never hard-codes the model's options.
Loading the page needs no API key; its API calls carry the key the user enters. The config
describes the first model (the one a request without `model` gets); the page's model picker lists
every served model from `GET /v1/models` (which needs the key where keys are set), whose cards
give each model's templates, sizes and pixel budgets in the same terms.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from model.config import SamplingParams
from server.errors import ServingError, stream_statuses
from server.models import aspect_label, width_height

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "image.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# The page runs only its own files and talks only to this server; the browser enforces it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["playground"])


class Template(BaseModel):
    aspect_ratio: str  # "W:H", as the page sends it in `aspect_ratio`
    h_div_w: float  # the official template
    sizes: dict[str, tuple[int, int]]  # pixel budget -> (width, height) in pixels


class PlaygroundConfig(BaseModel):
    model: str
    auth_required: bool
    max_n: int
    max_prompt_chars: int
    default_cfg: float
    default_tau: float
    default_pn: str
    pixel_budgets: list[str]  # the allowed ones, smallest first
    templates: list[Template]  # tallest first
    fixed_size: tuple[int, int] | None  # (width, height) of a model trained for one schedule only
    error_statuses: dict[str, int]  # error code -> HTTP status, for errors that arrive in a stream


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/config", response_model=PlaygroundConfig)
async def playground_config(request: Request) -> PlaygroundConfig:
    """What the playground may offer on this server: the first model's templates, pixel budgets and
    defaults (every model's are on its `GET /v1/models` card), the limits every model shares."""
    app = request.app.state
    model = app.models.default
    limits = model.limits
    templates = [Template(aspect_ratio=aspect_label(t), h_div_w=t, sizes=sizes) for t, sizes in model.template_sizes()]
    fixed = limits.fixed_schedule
    defaults = SamplingParams()
    return PlaygroundConfig(
        model=limits.name,
        auth_required=bool(app.api_keys),
        max_n=app.settings.max_n,
        max_prompt_chars=app.settings.max_prompt_chars,
        default_cfg=defaults.cfg_at(0),
        default_tau=defaults.tau_at(0),
        default_pn=limits.default_pn,
        pixel_budgets=model.allowed_budgets,
        templates=templates,
        fixed_size=width_height(model.engine.image_size(fixed)) if fixed is not None else None,
        error_statuses=stream_statuses(),
    )


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise ServingError("not found", 404, "invalid_request_error", "not_found", retryable=False)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
