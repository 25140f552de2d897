"""The FastAPI application factory: middleware, error mapping, health and metrics routes.

`create_app(settings, models)` (or `(settings, engine, limits)` for one model) wires handles on
`app.state`; the lifespan drains every model's engine on shutdown whatever happens. Generation
routes live in routes_generate / routes_openai.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from server import routes_generate, routes_openai, routes_playground
from server.auth import check_api_key
from server.engine import Engine
from server.errors import ServingError, body_too_large, error_body, validation_error
from server.images import ImageStore
from server.metrics import NO_MODEL, Metrics
from server.models import ServedModels
from server.ratelimit import RateLimiter
from server.service import ModelLimits, over_text_body_limit
from server.settings import Settings

log = logging.getLogger("infinity_serve.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def error_response(error: ServingError) -> JSONResponse:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, min(60, round(error.retry_after))))
    if error.retryable is not None:
        headers["x-should-retry"] = "true" if error.retryable else "false"
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


# The endpoints whose requests carry an input image get `max_image_body_bytes`; every other one keeps
# `max_body_bytes`. A /generate body over `max_body_bytes` without an `image` still gets 413, once
# parsed (routes_generate, and the validation handler below for a body that does not even parse).
IMAGE_PATHS = frozenset({"/generate", "/v1/images/edits", "/v1/images/variations"})


class BodyLimit:
    """413 for bodies over the limit, with or without Content-Length (pure ASGI).

    The body is read here, up to the limit, before the app sees it. Why not count inside the app's
    `receive`: FastAPI turns any error raised while it reads the body into a 400, so a chunked body
    without Content-Length got 400 instead of 413. Text bodies are small (JSON); image uploads are
    bounded by `image_max_bytes`. The size read is left on the request's state as `body_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, image_max_bytes: int) -> None:
        self.app, self.max_bytes, self.image_max_bytes = app, max_bytes, image_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.image_max_bytes if scope["path"] in IMAGE_PATHS else self.max_bytes
        too_big = body_too_large(limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(too_big)(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await error_response(too_big)(scope, receive, send)
            if not message.get("more_body", False):
                break
        scope.setdefault("state", {})["body_bytes"] = seen
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            # The whole body once, then the real channel (disconnect detection keeps working).
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings, engine: Engine | ServedModels, limits: ModelLimits | None = None) -> FastAPI:
    """`engine` and `limits`: one model; or the served models (ServedModels) alone."""
    if isinstance(engine, ServedModels):
        models = engine
    else:
        assert limits is not None, "one engine comes with its model's limits"
        models = ServedModels.one(engine, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            log.info("shutting down: draining for up to %.0fs", settings.drain_timeout_s)
            finished = models.drain(settings.drain_timeout_s)
            log.info("drained%s", "" if finished else " (timeout: work was left unfinished)")

    app = FastAPI(
        title="infinity-serve",
        version="0.1.0",
        lifespan=lifespan,
        description="Infinity text-to-image: REST and OpenAI-compatible images API",
    )
    app.state.settings, app.state.models = settings, models
    # The first model's (the default; the playground's config describes it, its picker lists every model).
    app.state.engine, app.state.limits = models.default.engine, models.default.limits
    app.state.metrics = models.metrics
    app.state.images = ImageStore(settings.url_ttl_s, settings.url_store_max_bytes)
    app.state.api_keys = [k.get_secret_value().encode() for k in settings.api_keys]
    app.state.rate_limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    # SIGTERM drains streams like any request (each ends with its work, within its deadline). Left on,
    # sse-starlette cuts every stream at the first signal, and its process-wide flag stays set after.
    AppStatus.disable_automatic_graceful_drain()
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, image_max_bytes=settings.max_image_body_bytes)
    app.add_middleware(RequestContext, metrics=models.metrics)  # sees every response
    # Outermost, so every layer sees the real client: X-Forwarded-For is applied only when the peer is
    # one of `trusted_proxies` (the rightmost untrusted address wins); anyone else's header is ignored.
    # Here rather than uvicorn's own option, so in-process tests and `serve` behave the same.
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        """Liveness: fails once no replica can ever serve again, so that the orchestrator restarts us."""
        if models.broken:
            return JSONResponse(
                {"status": "broken", "reason": "every replica worker died past its restart budget"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        """Ready when every model is; `models`: each one's own readiness."""
        ready = models.ready
        body = {"ready": ready, "model": models.default.name, "models": models.readiness()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        models.observe_memory()  # at scrape time too: a quiet server still reports memory now
        return Response(models.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_api_key)], tags=["openai"])
    async def list_models() -> dict:
        """Every served model (the first serves requests that name none), with what it can make."""
        return {"object": "list", "data": [m.card() for m in models]}

    app.include_router(routes_generate.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_playground.router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        if over_text_body_limit(request) and not (isinstance(exc.body, dict) and exc.body.get("image")):
            # A body let in for an image it does not carry (or that is not even JSON): too large.
            return error_response(body_too_large(request.app.state.settings.max_body_bytes))
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Raised by the framework itself: unknown route, wrong method, a body it cannot even decode.
        status = exc.status_code
        message = {404: "not found", 405: f"method {request.method} not allowed"}.get(status, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed", 400: "invalid_body"}.get(status, "invalid_request")
        return error_response(
            ServingError(
                message,
                status,
                "invalid_request_error",
                code,
                "body" if status == 400 else None,
                retryable=False,
                headers=dict(exc.headers or {}),
            )
        )

    # Unexpected exceptions are answered by RequestContext, inside Starlette's ServerErrorMiddleware,
    # so that the 500 carries x-request-id like every other response.


class RequestContext:
    """Request id (given or new) on scope state and response header, one log line and metrics per
    request, and the one place that turns an unexpected exception into a 500 (with the id, so that
    the body's "logged with the request id" can be followed).

    Pure ASGI (no BaseHTTPMiddleware) so that streaming and disconnect detection pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start, status, started = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error (request %s)", rid)
            self.metrics.errors.labels(NO_MODEL, "unhandled").inc()  # which model, if any, is not known here
            if not started:
                await error_response(ServingError("internal error; it was logged with the request id", 500))(
                    scope, receive, send_with_id
                )
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None)
            self.metrics.requests.labels(route or "unmatched", f"{status // 100}xx").inc()
            self.metrics.request_duration.labels(route or "unmatched").observe(elapsed)
            log.info(
                "request %s %s %s -> %d in %.3fs", rid, scope["method"], route or _loggable_path(scope), status, elapsed
            )


def _loggable_path(scope: Scope) -> str:
    """The path as sent (still percent-encoded, so `%0A` cannot start a forged log line), with any other
    unprintable byte escaped, and cut short. Matched routes log their template instead, which keeps
    secrets in paths (the ids of `/v1/images/{image_id}`) out of the log."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    text = raw.decode("latin-1").encode("unicode_escape").decode("ascii")
    return text if len(text) <= 200 else text[:200] + "..."
