"""Property-based fuzzing of both generation endpoints on a real uvicorn server.

Thousands of generated bodies, headers and query strings (hypothesis, derandomized so that CI is
reproducible; FUZZ_EXAMPLES scales the count). The properties: never a 5xx, never a hang (every
call has a timeout), every error is a JSON body with a message and, for a 400, the field it is
about; a 200 is a well-formed answer. Junk almost never passes validation, so valid bodies are
generated too: their 200s (JSON, image bytes, and both streams, event by event) are checked as well.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from tests.server.conftest import make_app, running_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
prompt = st.one_of(st.text(min_size=0, max_size=60), st.sampled_from(["a red circle", "two blue stars"]), junk)
count = st.one_of(st.integers(-3, 6), st.just(10**9), junk)
floats = st.one_of(st.floats(-10, 20), st.lists(st.floats(-5, 10), max_size=16), junk)
common = {
    "prompt": prompt,
    "negative_prompt": st.one_of(st.text(max_size=20), junk),
    "n": count,
    "seed": st.one_of(st.integers(-(2**65), 2**65), junk),
    "cfg": floats,
    "tau": floats,
    "top_k": st.one_of(st.integers(-2, 2000), junk),
    "top_p": st.one_of(st.floats(-1, 2), junk),
    "output_format": st.one_of(st.sampled_from(["png", "jpeg", "webp", "gif"]), junk),
    "stream": st.one_of(st.booleans(), junk),
    "partial_images": st.one_of(st.integers(-1, 20), junk),
}
generate_fields = {
    **common,
    "width": st.one_of(st.integers(-10, 20_000), junk),
    "height": st.one_of(st.integers(-10, 20_000), junk),
    "aspect_ratio": st.one_of(st.sampled_from(["1:1", "16:9", "2:1", "0:1", "11:1", "1e9:1", ":", "1.5"]), junk),
    "pn": st.one_of(st.sampled_from(["0.06M", "0.25M", "1M", "2M"]), junk),
}
openai_fields = {
    **common,
    "model": st.one_of(st.sampled_from(["infinity-test", "dall-e-3"]), junk),
    "size": st.one_of(st.sampled_from(["auto", "256x256", "512x256", "0x5", "99999x99999", "1024x"]), junk),
    "quality": st.one_of(st.sampled_from(["auto", "low", "high", "ultra"]), junk),
    "response_format": st.one_of(st.sampled_from(["b64_json", "url", "file"]), junk),
    "output_compression": st.one_of(st.integers(-5, 200), junk),
    "user": st.one_of(st.text(max_size=300), junk),
}
unknown = st.dictionaries(st.text(min_size=1, max_size=8), junk, max_size=2)
accept = st.sampled_from(["application/json", "image/png", "*/*", "text/event-stream", "image/*, application/json"])
# Header values are bytes on the wire: printable ASCII plus the high latin-1 range (no control bytes).
header_text = st.text(alphabet=st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=40).map(str.strip)
timeout_header = st.one_of(header_text, st.sampled_from(["nan", "inf", "-1", "1e309", "60"]))
ENDPOINTS = {"/generate": generate_fields, "/v1/images/generations": openai_fields}
valid_common = {
    "n": st.integers(1, 2),
    "seed": st.integers(0, 2**32),
    "stream": st.booleans(),
    "partial_images": st.integers(0, 3),
    "output_format": st.sampled_from(["png", "jpeg", "webp"]),
    "cfg": st.floats(1, 5),
    "tau": st.floats(0.5, 2),
}
VALID = {
    "/generate": {**valid_common, "aspect_ratio": st.sampled_from(["1:1", "2:1", "1:2"])},
    "/v1/images/generations": {**valid_common, "size": st.sampled_from(["auto", "256x256"])},
}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def url(pipeline):
    app, engine = make_app(pipeline, max_queue=16)
    with running_server(app) as base:
        yield base
    engine.drain(5)


def check(response: httpx.Response, path: str, body: object) -> str:
    """The properties of one answer; returns its kind ("error", "stream", "image" or "json")."""
    assert response.status_code < 500, response.text[:500]
    assert "Traceback" not in response.text and "/work/" not in response.text
    if response.status_code != 200:
        check_error_body(response.json())
        if response.status_code == 400:
            assert isinstance(response.json()["error"]["param"], str) and response.json()["error"]["param"]
        return "error"
    fields = body if isinstance(body, dict) else {}
    kind = response.headers["content-type"]
    assert kind.startswith("text/event-stream") == asks_for_stream(fields), (kind, fields)
    n = fields.get("n") or 1  # validated by now: an int (or a bool/float pydantic took)
    if kind.startswith("text/event-stream"):
        events = sse_events(response.text)
        (check_generate_stream if path == "/generate" else check_openai_stream)(events, int(n))
        return "stream"
    if kind.startswith("image/"):
        assert len(response.content) > 8
        return "image"
    answer = response.json()
    assert len(answer.get("data") or answer.get("images")) == n, answer
    return "json"


def asks_for_stream(fields: dict) -> bool:
    """What the body asks for, read as a pydantic bool field reads it (1, "true", "on" are yes)."""
    try:
        return fields.get("stream") is not None and TypeAdapter(bool).validate_python(fields["stream"])
    except ValidationError:
        return False


def check_error_body(body: dict) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body


def sse_events(text: str) -> list[tuple[str | None, dict]]:
    """(event name or None, its JSON data) per event; `: ping` comments skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        names = [line[6:].strip() for line in lines if line.startswith("event:")]
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert len(names) <= 1 and len(data) == 1 and len(lines) == len(names) + 1, block
        events.append((names[0] if names else None, json.loads(data[0])))
    return events


def check_generate_stream(events: list[tuple[str | None, dict]], n: int) -> None:
    """queued, then queued/preview events, then one `completed` (n images) or one `error`."""
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] in ("completed", "error"), names
    assert set(names[1:-1]) <= {"queued", "preview"}, names
    for name, data in events:
        if name == "queued":
            assert set(data) == {"id", "queue_depth", "images_ahead"}, data
        elif name == "preview":
            assert 0 <= data["scale_index"] < data["num_scales"] - 1 and len(data["images"]) == n, data.keys()
            assert all(base64.b64decode(image).startswith(PNG) for image in data["images"])
    name, data = events[-1]
    if name == "error":
        check_error_body(data)
    else:
        assert len(data["images"]) == n and all(image["b64"] for image in data["images"]), data.keys()


def check_openai_stream(events: list[tuple[str | None, dict]], n: int) -> None:
    """partial_image events (n per preview, indices 0, 1, ...), then n `completed` or one bare error."""
    partial = [data for name, data in events if name == "image_generation.partial_image"]
    assert len(partial) % n == 0 and [p["partial_image_index"] for p in partial] == sorted(
        i for i in range(len(partial) // n) for _ in range(n)
    ), [p.get("partial_image_index") for p in partial]
    assert all(p["type"] == "image_generation.partial_image" and p["b64_json"] for p in partial)
    rest = events[len(partial) :]
    if rest and rest[0][0] is None:  # the SDK reads a bare `error` field
        assert len(rest) == 1, [name for name, _ in events]
        check_error_body(rest[0][1])
        return
    assert [name for name, _ in rest] == ["image_generation.completed"] * n, [name for name, _ in events]
    assert all(data["b64_json"] and data["usage"]["output_tokens"] > 0 for _, data in rest)


def post(url: str, path: str, body: bytes, headers: dict[str, str], params=None) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers, params=params, timeout=60)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_json_bodies_never_give_a_server_error(url, path):
    @FUZZ
    @given(
        fields=st.fixed_dictionaries({}, optional=ENDPOINTS[path]), extra=unknown, accept=accept, timeout=timeout_header
    )
    def run(fields, extra, accept, timeout):
        body = {**extra, **fields}
        headers = {
            "content-type": "application/json",
            "accept": accept,
            "x-stainless-read-timeout": timeout.encode("latin-1"),
        }
        response = post(url, path, json.dumps(body).encode(), headers)
        check(response, path, body)

    run()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_valid_bodies_get_well_formed_answers_and_streams(url, path):
    """Bodies that pass validation: every answer is a 200 of the kind asked for, and well formed."""

    @settings(max_examples=max(20, EXAMPLES // 15), deadline=None, derandomize=True, database=None)
    @given(
        fields=st.fixed_dictionaries(
            {"prompt": st.sampled_from(["a red circle", "two blue stars", "a"])}, optional=VALID[path]
        ),
        accept=accept,
    )
    def run(fields, accept):
        response = post(url, path, json.dumps(fields).encode(), {"content-type": "application/json", "accept": accept})
        assert response.status_code == 200, response.text[:500]
        seen[check(response, path, fields)] += 1

    seen: Counter[str] = Counter()
    run()
    assert seen["stream"] and seen["json"], seen  # both branches of `check` ran


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_raw_bytes_headers_and_query_strings_never_give_a_server_error(url, path):
    @FUZZ
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.just(b'{"prompt": "\xff\xfe"}'),
            st.just(b"[1, 2]"),
            st.just(b'{"prompt": "a", "n": NaN}'),
            st.just(b"null"),
        ),
        content_type=st.sampled_from(
            ["application/json", "text/plain", "", "application/json; charset=latin-1", "multipart/form-data"]
        ),
        headers=st.dictionaries(
            st.sampled_from(["x-request-id", "authorization", "accept", "x-foo"]),
            header_text.map(lambda v: v.encode("latin-1")),
            max_size=3,
        ),
        params=st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3),
    )
    def run(body, content_type, headers, params):
        response = post(url, path, body, {**headers, "content-type": content_type}, params)
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None
        check(response, path, fields)

    run()


def test_image_ids_are_never_paths(url):
    @settings(max_examples=max(50, EXAMPLES // 5), deadline=None, derandomize=True, database=None)
    @given(
        image_id=st.one_of(
            st.text(max_size=30), st.sampled_from(["../../etc/passwd", "..%2F..%2Fetc", "%00", "a" * 300])
        )
    )
    def run(image_id):
        r = httpx.get(f"{url}/v1/images/{quote(image_id, safe='/.%')}", timeout=30)  # traversal stays raw
        if r.is_redirect:  # "id/" -> "id": the framework's slash redirect, same host
            assert r.headers["location"].startswith(url + "/v1/images/")
            return
        assert r.status_code in (404, 405) or (r.status_code == 200 and r.headers["content-type"].startswith("image/"))
        assert "root:" not in r.text

    run()


# Extreme but finite: the largest and smallest floats, subnormals, just outside each documented bound.
extreme_float = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            1.7976931348623157e308,
            -1.7976931348623157e308,
            5e-324,
            1e-300,
            30.0,
            30.000001,
            0.01,
            0.00999999,
            10.0,
            10.000001,
            0.0,
            -0.0,
        ]
    ),
)
extreme_int = st.one_of(st.integers(), st.sampled_from([2**63 - 1, 2**63, -(2**63), 2**64, 10**30]))
extreme_fields = {
    "cfg": st.one_of(extreme_float, st.lists(extreme_float, min_size=1, max_size=16)),
    "tau": st.one_of(extreme_float, st.lists(extreme_float, min_size=1, max_size=16)),
    "top_p": extreme_float,
    "top_k": extreme_int,
    "seed": extreme_int,
    "n": extreme_int,
    "width": extreme_int,
    "height": extreme_int,
    "partial_images": extreme_int,
}


def test_extreme_finite_numbers_never_touch_a_concurrent_normal_request(url):
    normal = {"prompt": "a red circle", "seed": 7, "tau": 1.0}
    solo = httpx.post(f"{url}/generate", json=normal, timeout=60).json()["images"][0]["b64"]

    @settings(max_examples=max(60, EXAMPLES // 3), deadline=None, derandomize=True, database=None)
    @given(fields=st.fixed_dictionaries({}, optional=extreme_fields).filter(bool))
    def run(fields):
        body = {"prompt": "x", **fields}
        if "width" in body or "height" in body:
            body.setdefault("width", 64), body.setdefault("height", 64)
        with ThreadPoolExecutor(2) as pool:
            extreme = pool.submit(httpx.post, f"{url}/generate", json=body, timeout=60)
            same = pool.submit(httpx.post, f"{url}/generate", json=normal, timeout=60)
            extreme, same = extreme.result(), same.result()
        check(extreme, "/generate", body)
        assert extreme.status_code in (200, 400, 422, 429), extreme.text
        assert same.status_code in (200, 429), same.text  # a 429 is the queue bound, never the body
        if same.status_code == 200:
            assert same.json()["images"][0]["b64"] == solo  # the same pixels as alone

    run()
