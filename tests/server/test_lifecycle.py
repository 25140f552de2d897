"""Start-up settings, graceful drain on SIGTERM, and the real `infinity-serve serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from pydantic import ValidationError

from server.main import DrainingServer
from server.settings import Settings
from tests.server.conftest import Gate, free_port, make_app


def test_bad_settings_fail_fast_with_a_clear_message(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(transformer=tmp_path / "a.pth", vae=tmp_path / "v.pth", text_encoder=tmp_path)
    with pytest.raises(ValidationError, match="together"):
        Settings(transformer=tmp_path)
    with pytest.raises(ValidationError, match="not available|unsupported|unknown"):
        Settings(devices=["cuda:7"])
    with pytest.raises(ValidationError, match="unknown device"):
        Settings(devices=["gpu0"])
    with pytest.raises(ValidationError, match="max_n 8 exceeds max_batch_size 4"):
        Settings(max_n=8, max_batch_size=4)
    with pytest.raises(ValidationError, match="default_pn 1M exceeds max_pn"):
        Settings(default_pn="1M", max_pn="0.25M")
    assert Settings(_env_file=None).devices == ["cpu"]


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("INFINITY_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("INFINITY_DEVICES", '["cpu"]')
    assert Settings().max_batch_size == 16


def test_sigterm_drains_in_flight_work_and_refuses_new_requests(pipeline):
    app, engine = make_app(pipeline, drain_timeout_s=20)
    gate = Gate()
    engine.fault_hook = gate
    gate.close()
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None), engine, 20)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    results = []
    inflight = threading.Thread(target=lambda: results.append(httpx.post(f"{url}/generate", json={"prompt": "a"},
                                                                         timeout=30)))
    inflight.start()
    assert gate.entered.wait(10)
    server.handle_exit(signal.SIGTERM, None)
    refused = httpx.post(f"{url}/generate", json={"prompt": "late"}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert "retry-after" in refused.headers
    assert httpx.get(f"{url}/readyz").status_code == 503
    gate.opened.set()
    inflight.join(30)
    thread.join(30)
    assert results[0].status_code == 200                   # in-flight work completed
    assert not thread.is_alive()                           # and the server exited


def test_serve_command_starts_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "INFINITY_MAX_BATCH_SIZE": "4", "INFINITY_MAX_N": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 1, "width": 1024, "height": 1024},
                       timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["model"] == "infinity-default"       # the shipped default model
        assert (body["width"], body["height"], body["pn"]) == (64, 64, "custom")  # the size it was trained for
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), output   # uvicorn re-raises the signal once drained
    assert "embedded default model" in output
    assert "draining" in output


def test_without_trained_default_files_a_random_placeholder_is_loudly_logged(tmp_path, caplog):
    from model.config import RuntimeConfig
    from weights.default import load_default_pipeline

    with caplog.at_level("WARNING"):
        pipe, default = load_default_pipeline(RuntimeConfig(), root=tmp_path)
    assert default.placeholder and default.name == "infinity-tiny-random"
    assert "TINY RANDOM model" in caplog.text
