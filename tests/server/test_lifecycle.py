"""Start-up settings, graceful drain on SIGTERM, and the real `infinity-serve serve` process."""

from __future__ import annotations

import os
import platform
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
    with pytest.raises(ValidationError, match=r"not available|unsupported|unknown"):
        Settings(devices=["cuda:7"])
    with pytest.raises(ValidationError, match="unknown device"):
        Settings(devices=["gpu0"])
    with pytest.raises(ValidationError, match="max_n 8 exceeds max_batch_size 4"):
        Settings(max_n=8, max_batch_size=4)
    with pytest.raises(ValidationError, match="max_n 4 exceeds max_queue 2"):
        Settings(max_n=4, max_queue=2)
    with pytest.raises(ValidationError, match="default_pn 1M exceeds max_pn"):
        Settings(default_pn="1M", max_pn="0.25M")
    assert Settings(_env_file=None).devices == ["cpu"]


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("INFINITY_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("INFINITY_DEVICES", '["cpu"]')
    assert Settings().max_batch_size == 16


def _held_draining_server(pipeline, drain_timeout_s: float):
    """A DrainingServer on a real port whose engine holds every batch at a closed Gate."""
    app, engine = make_app(pipeline, drain_timeout_s=drain_timeout_s)
    gate = Gate()
    engine.fault_hook = gate
    gate.close()
    port = free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None), engine, drain_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, thread, engine, gate, f"http://127.0.0.1:{port}"


def test_sigterm_drains_in_flight_work_and_refuses_new_requests(pipeline):
    server, thread, engine, gate, url = _held_draining_server(pipeline, 20)
    results = []
    inflight = threading.Thread(
        target=lambda: results.append(httpx.post(f"{url}/generate", json={"prompt": "a"}, timeout=30))
    )
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
    assert results[0].status_code == 200  # in-flight work completed
    assert not thread.is_alive()  # and the server exited


def test_serve_command_starts_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "INFINITY_MAX_BATCH_SIZE": "4", "INFINITY_MAX_N": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
        r = httpx.post(
            f"{url}/generate", json={"prompt": "a red circle", "seed": 1, "width": 1024, "height": 1024}, timeout=60
        )
        body = r.json()
        assert r.status_code == 200 and body["model"] == "infinity-default"  # the shipped default model
        assert (body["width"], body["height"], body["pn"]) == (64, 64, "custom")  # the size it was trained for
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a", "response_format": "url"}, timeout=60)
        image_url = r.json()["data"][0]["url"]
        assert httpx.get(image_url).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal once drained
    assert image_url.rsplit("/", 1)[1] not in output  # the id is a secret: in no log, uvicorn's included
    assert "GET /v1/images/{image_id} -> 200" in output
    assert "embedded default model" in output
    if platform.libc_ver()[0] == "glibc":  # model/host_memory.py: elsewhere it says why not, and serves on
        assert "freed memory kept for reuse (glibc malloc: one arena, no mmap, no trim): True" in output
    assert "draining" in output


def test_without_trained_default_files_a_random_placeholder_is_loudly_logged(tmp_path, caplog):
    from model.config import RuntimeConfig
    from weights.default import load_default_pipeline

    with caplog.at_level("WARNING"):
        pipe, default = load_default_pipeline(RuntimeConfig(), root=tmp_path)
    assert default.placeholder and default.name == "infinity-tiny-random"
    assert "TINY RANDOM model" in caplog.text


def test_a_drain_past_its_deadline_cancels_the_running_request_and_exits_in_time(pipeline):
    server, thread, engine, gate, url = _held_draining_server(pipeline, 1.0)
    results: list = []

    def post() -> None:
        try:
            results.append(httpx.post(f"{url}/generate", json={"prompt": "a"}, timeout=30))
        except httpx.TransportError as e:  # the connection is closed under it: expected
            results.append(e)

    inflight = threading.Thread(target=post)
    inflight.start()
    assert gate.entered.wait(10)
    start = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(15)
    took = time.monotonic() - start
    try:
        assert not thread.is_alive() and took < 1.0 + 2.0, took  # one deadline (1 s), not three
        # uvicorn cancelled the handler at the deadline, and the handler cancelled its engine ticket
        cancelled = 'infinity_cancelled_requests_total{model="infinity-test",stage="running"} 1.0'
        assert cancelled in engine.metrics.owner.render().decode()
    finally:
        gate.opened.set()
        inflight.join(10)


def _start_serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *args, "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.2)


def _wait_for_metric(url: str, line: str) -> None:
    deadline = time.monotonic() + 30
    while line not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"never saw {line}"
        time.sleep(0.05)


@pytest.mark.static_batching  # requests queued behind a running batch (continuous: admitted at the next scale)
def test_sigterm_on_the_real_process_finishes_running_work_refuses_queued_and_exits_in_time():
    env = {
        "INFINITY_MAX_BATCH_SIZE": "1",
        "INFINITY_MAX_N": "1",
        "INFINITY_DRAIN_TIMEOUT_S": "20",
        "HF_HUB_OFFLINE": "1",
    }
    proc, url = _start_serve(["-m", "tests.server.slow_serve", "1.5"], env)  # every batch takes >= 1.5 s
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> threading.Thread:
        t = threading.Thread(
            target=lambda: results.__setitem__(
                name, httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 1}, timeout=60)
            )
        )
        t.start()
        return t

    try:
        threads = [post("running")]
        _wait_for_metric(url, 'infinity_running_rows{model="infinity-default"} 1.0')
        threads += [post("queued-1"), post("queued-2")]
        _wait_for_metric(url, 'infinity_queue_depth{model="infinity-default"} 2.0')
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - start
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results["running"].status_code == 200, output  # in-flight work finished
    for name in ("queued-1", "queued-2"):  # queued work refused at once
        r = results[name]
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
        assert "retry-after" in r.headers
    assert took < 20, took  # inside the one drain deadline
    assert "2 queued requests refused with 503" in output, output
