"""Error paths: 413 for any oversized body, 500s that carry their request id, log lines that cannot be
forged and never hold the secret ids of `/v1/images/{id}`."""

from __future__ import annotations

import logging

import httpx

from tests.server.conftest import running_server

LOGGER = "infinity_serve.http"


def _chunks(total: int, size: int = 4096):
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


def test_an_oversized_chunked_body_gets_413_in_process_and_on_a_real_server(app_and_engine, client):
    app, engine, gate = app_and_engine
    limit = app.state.settings.max_body_bytes
    headers = {"content-type": "application/json"}
    r = client.post("/generate", content=_chunks(limit + 1), headers=headers)  # no Content-Length: chunked
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    with running_server(app) as url:
        r = httpx.post(f"{url}/generate", content=_chunks(4 * limit), headers=headers, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        ok = b'{"prompt": "a red circle", "seed": 1}'
        r = httpx.post(f"{url}/generate", content=iter([ok[:10], ok[10:]]), headers=headers, timeout=30)
        assert r.status_code == 200, r.text  # a small chunked body is fine


def test_an_unexpected_error_gets_a_500_with_the_request_id_it_names(app_and_engine, client, caplog):
    app, engine, gate = app_and_engine

    async def boom() -> None:
        raise RuntimeError("secret internal detail /srv/path")

    app.add_api_route("/boom", boom)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = client.get("/boom", headers={"x-request-id": "trace-123"})
        fresh = client.get("/boom")
    assert r.status_code == 500 and r.headers["x-request-id"] == "trace-123"
    assert "request id" in r.json()["error"]["message"] and "secret" not in r.text and "/srv" not in r.text
    assert fresh.status_code == 500 and len(fresh.headers["x-request-id"]) == 32
    logged = caplog.text
    assert "unhandled error (request trace-123)" in logged and "RuntimeError" in logged
    assert "request trace-123 GET /boom -> 500" in logged
    assert 'infinity_errors_total{model="",reason="unhandled"} 2.0' in client.get("/metrics").text


def test_percent_encoded_newlines_cannot_forge_log_lines(client, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = client.get("/nothing%0A%0Drequest%20forged%20GET%20/admin%20-%3E%20200%1B[2J")
    assert r.status_code == 404
    lines = [rec.getMessage() for rec in caplog.records if rec.name == LOGGER]
    assert len(lines) == 1 and "\n" not in lines[0] and "\r" not in lines[0] and "\x1b" not in lines[0], lines
    assert "%0A%0Drequest%20forged" in lines[0]


def test_stored_image_ids_never_reach_the_log(client, caplog):
    with caplog.at_level(logging.INFO):
        r = client.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"})
        url = r.json()["data"][0]["url"]
        image_id = url.rsplit("/", 1)[1]
        assert client.get(url).status_code == 200
        assert client.get(url + "x").status_code == 404  # a wrong guess is not logged either
    ours = "\n".join(rec.getMessage() for rec in caplog.records if not rec.name.startswith("httpx"))  # not the client's
    assert image_id not in ours and image_id[:12] not in ours
    assert "GET /v1/images/{image_id} -> 200" in ours
