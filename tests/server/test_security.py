"""What never reaches the logs or a client: API keys, prompts (unless opted in), stack traces; what needs
a key, and that a key-less server is never open to the network by accident."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.main import warn_if_open
from server.settings import Settings
from tests.server.conftest import make_app

SECRET, PROMPT = "sk-very-secret-key-123", "a purple star called zanzibar"


def _generate_and_fail_once(pipeline, caplog, **settings) -> str:
    app, engine = make_app(pipeline, api_keys=[SECRET], **settings)
    try:
        c = TestClient(app)
        with caplog.at_level(logging.DEBUG):
            ok = c.post("/generate", json={"prompt": PROMPT}, headers={"authorization": f"Bearer {SECRET}"})
            assert ok.status_code == 200
            engine.fault_hook = lambda requests: (_ for _ in ()).throw(RuntimeError(f"boom in {__file__}"))
            bad = c.post("/generate", json={"prompt": PROMPT}, headers={"authorization": f"Bearer {SECRET}"})
            assert bad.status_code == 500
            assert "boom" not in bad.text and __file__ not in bad.text and "Traceback" not in bad.text
            wrong = c.post("/generate", json={"prompt": PROMPT}, headers={"authorization": f"Bearer {SECRET}x"})
            assert wrong.status_code == 401 and SECRET not in wrong.text
        return caplog.text
    finally:
        engine.drain(5)


def test_keys_and_prompts_are_not_logged_by_default(pipeline, caplog):
    logged = _generate_and_fail_once(pipeline, caplog)
    assert "request " in logged  # requests are logged (id, status, timing) ...
    assert SECRET not in logged and PROMPT not in logged  # ... but neither the key nor the prompt


def test_bodies_are_logged_only_when_the_operator_opts_in(pipeline, caplog):
    logged = _generate_and_fail_once(pipeline, caplog, log_requests_body=True)
    assert PROMPT in logged and SECRET not in logged


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "server.internal"])
def test_a_key_less_server_beyond_loopback_is_refused(host):
    with pytest.raises(ValidationError, match="api_keys is empty: set api_keys, or allow_unauthenticated"):
        Settings(host=host)


def test_the_image_default_host_without_keys_is_refused(monkeypatch):
    monkeypatch.setenv("INFINITY_HOST", "0.0.0.0")  # what the Dockerfile sets
    with pytest.raises(ValidationError, match="allow_unauthenticated"):
        Settings()
    monkeypatch.setenv("INFINITY_API_KEYS", '["k1"]')  # what the Kubernetes secret provides
    assert not Settings().open_to_network


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_needs_no_key(host, caplog):
    settings = Settings(host=host)
    with caplog.at_level(logging.WARNING):
        warn_if_open(settings)
    assert not settings.open_to_network and "NO API KEYS" not in caplog.text


def test_serving_open_on_purpose_is_allowed_with_a_loud_warning(caplog):
    settings = Settings(host="0.0.0.0", allow_unauthenticated=True)
    with caplog.at_level(logging.WARNING):
        warn_if_open(settings)
    assert settings.open_to_network
    assert "NO API KEYS on 0.0.0.0" in caplog.text and caplog.records[-1].levelno == logging.WARNING
    caplog.clear()
    warn_if_open(Settings(host="0.0.0.0", api_keys=["k1"]))  # keys given: nothing to warn about
    assert "NO API KEYS" not in caplog.text


# Answer without a key, and why (docs/serving.md, "Paths that need no key"): probes for the kubelet, the scrape
# for Prometheus, the API description, the playground page (it asks for the key itself), and stored
# `url` images, whose random 256-bit ids are the capability.
KEY_FREE = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/images/{image_id}"),
    ("get", "/playground/config"),
}


def test_only_the_documented_paths_answer_without_a_key(pipeline):
    app, engine = make_app(pipeline, api_keys=[SECRET])
    try:
        c = TestClient(app)
        operations = [(m, p) for p, ops in c.get("/openapi.json").json()["paths"].items() for m in ops]
        assert set(operations) > KEY_FREE
        for method, path in operations:
            status = c.request(method, path.replace("{image_id}", "no-such-image"), json={}).status_code
            assert (status == 401) == ((method, path) not in KEY_FREE), (method, path, status)
        for page in ("/", "/docs", "/openapi.json", "/playground/app.js"):  # outside the schema
            assert c.get(page).status_code == 200, page
    finally:
        engine.drain(5)
