"""server/errors.py: one mapping from engine errors to HTTP, also for errors that arrive in a stream."""

import inspect

from server import errors
from server.errors import ServingError, error_body, stream_statuses

NOT_FACTORIES = {"error_body", "stream_statuses", "validation_error"}  # build bodies or map others' errors
# Refusals of the request itself, answered before any stream begins (never an `error` event).
AT_THE_DOOR = {"invalid_value", "body_too_large", "model_not_found"}


def every_error() -> list[ServingError]:
    """One instance of each factory in server/errors.py (the ones taking arguments get placeholders)."""
    made = []
    for name, fn in inspect.getmembers(errors, inspect.isfunction):
        if fn.__module__ != errors.__name__ or name.startswith("_") or name in NOT_FACTORIES:
            continue
        params = inspect.signature(fn).parameters
        args = {"message": "m", "param": "p", "retry_after": 1.0, "limit": 1024, "name": "x", "served": ["a"]}
        made.append(fn(**{k: args[k] for k in params if k in args}))
    return made


def test_every_engine_error_code_has_its_status_for_streams():
    """A stream's error event carries no status line: the page maps the code with this table, which
    must know every engine error (a missing one showed a 422 as 'Server error (500)')."""
    table = stream_statuses()
    engine_errors = [e for e in every_error() if e.code not in AT_THE_DOOR]
    assert engine_errors, "found no error factories"
    for error in engine_errors:
        assert table[error.code] == error.status, error.code
    assert table["non_finite_logits"] == 422


def test_the_body_has_the_openai_shape():
    body = error_body(errors.invalid("`n` must be at most 4", "n"))
    assert body == {
        "error": {
            "message": "`n` must be at most 4",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_value",
        }
    }


def test_the_playground_gets_the_table(client):
    assert client.get("/playground/config").json()["error_statuses"] == stream_statuses()
