"""Domain errors of the serving engine and their single mapping to HTTP.

Routes raise these (or let validation fail); the app's handlers turn every one of them into an
OpenAI-shaped body `{"error": {message, type, param, code}}`, built by `error_body` (also for a
stream's `error` event). No stack trace or internal path ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class ServingError(Exception):
    message: str
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None  # seconds, sent as Retry-After (<= 60: the SDK ignores more)
    retryable: bool | None = None  # sent as x-should-retry when known
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(error: ServingError) -> dict:
    """The OpenAI-shaped body of an error: the one place it is built (JSON responses and SSE events)."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ServingError:
    return ServingError(message, 400, "invalid_request_error", code, param, retryable=False)


def body_too_large(limit: int) -> ServingError:
    return ServingError(
        f"request body larger than {limit} bytes", 413, "invalid_request_error", "body_too_large", retryable=False
    )


def _field(error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "header", "path")]
    return loc[0] if loc else "body"  # the top-level field (union members add noise below it)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ServingError:
    """A pydantic validation failure (of a JSON body or a form) as a 400 naming its top-level field."""
    param = _field(errors[0])
    # A union such as `float | list[float]` reports one error per member; the one about a list's bad
    # element (its input is a leaf value) says more than "should be a valid number" about the list.
    same_field = [e for e in errors if _field(e) == param]
    first = next((e for e in same_field if not isinstance(e.get("input"), (list, dict))), errors[0])
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {message}", "body", "invalid_json")
    got = first.get("input")
    shown = f" (got {got!r})" if isinstance(got, (int, float, str, bool)) and len(repr(got)) < 80 else ""
    return invalid(f"invalid `{param}`: {message}{shown}", param)


def model_not_found(name: str, served: Sequence[str]) -> ServingError:
    return ServingError(
        f"the model {name!r} does not exist on this server; it serves {list(served)}",
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
        retryable=False,
    )


def queue_full(retry_after: float) -> ServingError:
    return ServingError(
        "the server is busy: the queue is full, retry later",
        429,
        "rate_limit_error",
        "queue_full",
        retry_after=retry_after,
        retryable=True,
    )


def draining() -> ServingError:
    return ServingError("the server is shutting down", 503, "server_error", "draining", retry_after=5, retryable=True)


def not_ready() -> ServingError:
    return ServingError("the model is not ready", 503, "server_error", "not_ready", retry_after=5, retryable=True)


def deadline_unreachable(retry_after: float) -> ServingError:
    return ServingError(
        "the request cannot start before its deadline (queue too long)",
        503,
        "server_error",
        "deadline_unreachable",
        retry_after=retry_after,
        retryable=True,
    )


def deadline_exceeded() -> ServingError:
    return ServingError(
        "the request did not finish before its deadline", 504, "server_error", "deadline_exceeded", retryable=True
    )


def generation_failed() -> ServingError:
    return ServingError(
        "image generation failed; the error was logged with the request id",
        500,
        "server_error",
        "generation_failed",
        retryable=True,
    )


def nonfinite_sampling() -> ServingError:
    return ServingError(
        "the sampling parameters made this model's logits non-finite; lower `cfg` or raise `tau`",
        422,
        "invalid_request_error",
        "non_finite_logits",
        retryable=False,
    )


def out_of_memory() -> ServingError:
    return ServingError(
        "the device ran out of memory for this request; ask for fewer or smaller images",
        503,
        "server_error",
        "out_of_memory",
        retry_after=10,
        retryable=True,
    )


def cancelled() -> ServingError:
    return ServingError("the request was cancelled", 499, "server_error", "cancelled", retryable=False)


def stream_statuses() -> dict[str, int]:
    """The HTTP status of each error code that can end a running request, for clients that receive it
    inside a stream (where the response status is already 200): the playground shows it."""
    errors = (
        queue_full(1),
        draining(),
        not_ready(),
        deadline_unreachable(1),
        deadline_exceeded(),
        generation_failed(),
        nonfinite_sampling(),
        out_of_memory(),
        cancelled(),
    )
    return {e.code: e.status for e in errors if e.code is not None}
