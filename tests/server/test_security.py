"""What never reaches the logs or a client: API keys, prompts (unless opted in), stack traces."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

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
    assert "request " in logged                       # requests are logged (id, status, timing) ...
    assert SECRET not in logged and PROMPT not in logged           # ... but neither the key nor the prompt


def test_bodies_are_logged_only_when_the_operator_opts_in(pipeline, caplog):
    logged = _generate_and_fail_once(pipeline, caplog, log_requests_body=True)
    assert PROMPT in logged and SECRET not in logged
