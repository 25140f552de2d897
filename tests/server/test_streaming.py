"""Streams under pressure: bounded previews (latest wins), keep-alive pings, the send timeout."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gc
import io
import json
import signal
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from sse_starlette.sse import AppStatus

from server.engine import Preview
from server.metrics import Metrics
from server.service import PreviewMailbox, preview_sink, progress, sse
from server.settings import Settings
from tests.server.conftest import Gate, make_app, running_server

STALLED = 3  # clients that never read, in one batch with a reader


def preview(scale: int) -> Preview:
    return Preview(scale, 1000, [np.zeros((8, 8, 3), np.uint8)])


def poll(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# ---- the mailbox ----------------------------------------------------------------------------------
def test_mailbox_without_a_reader_holds_only_the_newest_preview():
    replaced = []
    box = PreviewMailbox(on_replace=lambda: replaced.append(1))
    for scale in range(1000):
        box.put(preview(scale))
    assert len(box) == 1 and box.replaced == 999 and len(replaced) == 999
    assert box.take().scale_index == 999
    assert len(box) == 0 and box.take() is None


def test_mailbox_wait_returns_once_a_preview_is_pending_and_leaves_it_there():
    async def scenario() -> None:
        box = PreviewMailbox()
        waiting = asyncio.ensure_future(box.wait())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        box.put(preview(1))
        await asyncio.wait_for(waiting, 1)
        box.put(preview(2))  # still unread: replaced, not queued
        assert len(box) == 1 and box.take().scale_index == 2
        again = asyncio.ensure_future(box.wait())  # taken: the next wait blocks again
        await asyncio.sleep(0.01)
        assert not again.done()
        again.cancel()

    asyncio.run(scenario())


class _Connected:
    async def is_disconnected(self) -> bool:
        return False


class _Engine:
    def cancel(self, ticket, stage_hint: str) -> None:
        ticket.future.cancel()


def test_progress_of_a_stuck_consumer_yields_only_the_latest_preview_then_the_output():
    metrics = Metrics().for_model("m")
    ticket = type("Ticket", (), {"future": concurrent.futures.Future()})()

    async def scenario() -> list:
        box = PreviewMailbox(metrics.previews_dropped.inc)
        items = progress(_Connected(), _Engine(), ticket, box, deadline=time.monotonic() + 30)
        sink = preview_sink(box)

        def worker() -> None:  # previews from another thread, nobody reading
            for scale in range(100):
                sink(preview(scale))
            ticket.future.set_result("output")

        await asyncio.to_thread(worker)
        await asyncio.sleep(0.05)  # the loop runs the sink's callbacks
        return [item async for item in items]

    got = asyncio.run(scenario())
    assert [p.scale_index for p in got[:-1]] == [99] and got[-1] == "output"
    assert b'infinity_previews_dropped_total{model="m"} 99.0' in metrics.owner.render()


def test_events_are_framed_as_before_the_library():
    """Clients split on LF (the playground, the tests); the OpenAI error event has no name."""
    assert sse({"a": 1}, "queued").encode() == b'event: queued\ndata: {"a": 1}\n\n'
    assert sse({"error": {"code": "x"}}).encode() == b'data: {"error": {"code": "x"}}\n\n'


@pytest.mark.parametrize("field", ["stream_ping_s", "stream_send_timeout_s"])
def test_stream_settings_must_be_positive(field):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: 0})


# ---- keep-alive -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"prompt": "a", "stream": True, "partial_images": 1}),
        ("/v1/images/generations", {"prompt": "a", "stream": True, "partial_images": 1}),
    ],
)
def test_a_silent_stream_sends_ping_comments(pipeline, path, body):
    app, engine = make_app(pipeline, stream_ping_s=0.1)
    gate = Gate()
    engine.fault_hook = gate
    gate.close()  # the request starts, then nothing happens
    try:
        with running_server(app) as url, httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as r:
            lines = r.iter_lines()
            before = []
            for line in lines:
                if line == ": ping":
                    break
                before.append(line)
            else:
                pytest.fail(f"the stream ended without a ping comment: {before}")
            assert not any("preview" in line or "completed" in line or "partial" in line for line in before)
            gate.opened.set()  # only now can anything but a ping be sent
            rest = [line for line in lines if line.startswith("event:")]
        assert rest[-1] in ("event: completed", "event: image_generation.completed"), rest
    finally:
        gate.opened.set()
        engine.drain(5)


def test_openai_client_reads_a_stream_with_pings_between_events(pipeline):
    app, engine = make_app(pipeline, stream_ping_s=0.02)
    gate = Gate()
    engine.fault_hook = gate
    gate.close()

    def open_later() -> None:  # several pings land before the first event
        gate.entered.wait(10)
        time.sleep(0.3)
        gate.opened.set()

    threading.Thread(target=open_later, daemon=True).start()
    try:
        with running_server(app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            events = list(client.images.generate(prompt="a", stream=True, partial_images=2))
        assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert np.asarray(Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))).shape == (64, 64, 3)
    finally:
        gate.opened.set()
        engine.drain(5)


def test_a_sigterm_earlier_in_the_process_does_not_cut_later_streams(pipeline):
    """sse-starlette's own shutdown handling sets a process-wide flag on SIGTERM; the server drains
    instead, so the flag must not be set, or every later stream in the process ends at once."""
    app, engine = make_app(pipeline)
    try:
        uvicorn.Server(uvicorn.Config(app)).handle_exit(signal.SIGTERM, None)
        with TestClient(app).stream("POST", "/generate", json={"prompt": "a", "stream": True}) as r:
            text = "".join(r.iter_text())
        assert "event: completed" in text
    finally:
        AppStatus.should_exit = False
        engine.drain(5)


# ---- clients that stop reading ----------------------------------------------------------------------
def stalled_client(port: int, body: dict) -> socket.socket:
    """Sends a request and never reads: a small receive window, so the server's sends block soon."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window
    s.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    s.sendall(
        b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    return s


def hold_before_last_scale(monkeypatch, pipeline, hold: threading.Event) -> None:
    """Batches with a `stalled` prompt pause after their last preview until `hold` is set: the
    requests are still running when their streams time out, and every preview has been made."""
    real = pipeline.generate

    def generate(prompts, schedule, params, on_scale=None, images=None):
        def scale(event):
            drop = on_scale(event)
            if event.scale_index == event.num_scales - 2:
                assert hold.wait(60), "hold never released"
            return drop

        held = on_scale is not None and "stalled" in prompts
        return real(prompts, schedule, params, on_scale=scale if held else on_scale, images=images)

    monkeypatch.setattr(pipeline, "generate", generate)


def live_previews() -> int:
    gc.collect()
    return sum(isinstance(o, Preview) for o in gc.get_objects())


@pytest.mark.static_batching  # holds the batch through pipeline.generate (continuous steps a Generation)
def test_clients_that_never_read_are_cut_and_pin_one_preview_each(pipeline, monkeypatch):
    # The send timeout outlasts the making of the previews (about a second here), so that most of
    # them arrive while the stalled streams are blocked; the hold keeps the requests running after.
    app, engine = make_app(pipeline, max_batch_size=8, max_queue=64, stream_send_timeout_s=3, stream_ping_s=0.2)
    gate, hold = Gate(), threading.Event()
    engine.fault_hook = gate
    hold_before_last_scale(monkeypatch, pipeline, hold)
    baseline = live_previews()
    sockets: list[socket.socket] = []
    try:
        with running_server(app, send_buffer=16384) as url:
            port = int(url.rsplit(":", 1)[1])
            gate.close()  # park a blocker, so that all of them share a batch
            blocker = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json={"prompt": "b"}, timeout=60))
            blocker.start()
            assert gate.entered.wait(10)
            body = {"prompt": "stalled", "stream": True, "pn": "0.25M"}  # every scale's preview
            sockets = [stalled_client(port, {**body, "seed": i}) for i in range(STALLED)]
            read: list[str] = []
            reader = threading.Thread(
                target=lambda: read.append(
                    httpx.post(f"{url}/generate", json={**body, "prompt": "reader"}, timeout=60).text
                )
            )
            reader.start()
            poll(lambda: engine.batcher.depth == STALLED + 1, what="all requests queued")
            gate.opened.set()

            running = 'infinity_cancelled_requests_total{model="infinity-test",stage="running"}'
            poll(
                lambda: metric(url, running) == STALLED,
                what="the stalled streams cancelled after the send timeout",
            )
            # the worker is still held and every preview was made, yet each stream pins at most one
            # (its mailbox, still referenced by the running request), and the reader's frame one more
            assert live_previews() - baseline <= STALLED + 2
            assert metric(url, 'infinity_previews_dropped_total{model="infinity-test"}') > 0  # replaced while blocked
            hold.set()
            reader.join(60)
            blocker.join(60)
            assert "event: completed" in read[0] and '"seed"' in read[0].rsplit("event: completed", 1)[1]
            rows = 'infinity_running_rows{model="infinity-test"}'
            poll(lambda: engine.batcher.depth == 0 and metric(url, rows) == 0, what="the engine idle")
            assert metric(url, 'infinity_images_generated_total{model="infinity-test"}') == 2  # blocker and reader only
    finally:
        hold.set()
        gate.opened.set()
        for s in sockets:
            s.close()
        engine.drain(5)


def test_a_stream_client_that_disconnects_while_queued_is_cancelled(pipeline):
    app, engine = make_app(pipeline)
    gate = Gate()
    engine.fault_hook = gate
    try:
        with running_server(app) as url:
            gate.close()
            blocker = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json={"prompt": "b"}, timeout=60))
            blocker.start()
            assert gate.entered.wait(10)
            with httpx.stream("POST", f"{url}/generate", json={"prompt": "a", "stream": True}, timeout=30) as r:
                lines = r.iter_lines()  # kept: dropping it would close the connection now
                assert next(lines) == "event: queued"
                assert engine.batcher.depth == 1
            poll(
                lambda: metric(url, 'infinity_cancelled_requests_total{model="infinity-test",stage="queued"}') == 1,
                what="the queued stream cancelled",
            )
            assert engine.batcher.depth == 0
            gate.opened.set()
            blocker.join(60)
    finally:
        gate.opened.set()
        engine.drain(5)
