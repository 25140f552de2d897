"""A real engine on the tiny models, and the app around it (in-process and on a real port)."""

from __future__ import annotations

import copy
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi.testclient import TestClient

from model.pipeline import InfinityPipeline
from model.text_encoder import T5TextEncoder
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.service import ModelLimits
from server.settings import Settings

LIMITS = ModelLimits("infinity-test", default_pn="0.06M", max_pn="0.25M")


class Gate:
    """An engine test hook that holds the worker until opened (to fill the queue on purpose)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Event()

    def close(self) -> None:
        self.opened.clear()
        self.entered.clear()

    def __call__(self, requests) -> None:
        self.entered.set()
        assert self.opened.wait(30), "gate never opened"


def wait_until(condition, timeout: float = 10) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False): for state that other
    threads reach in their own time, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def pipeline(t5_dir, tiny_transformer, tiny_vae) -> InfinityPipeline:
    return InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))


def make_app(pipeline, **overrides):
    values = dict(max_batch_size=4, max_n=4, max_wait_ms=30, max_queue=4, warmup=False)
    values.update(overrides)
    settings = Settings(**values)
    engine = Engine(
        {"cpu": pipeline},
        Metrics().for_model(LIMITS.name),
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.max_queue,
        settings.memory_budget_bytes,
        settings.worker_restarts,
        batching=settings.batching,
    )
    engine.start()
    return create_app(settings, engine, LIMITS), engine


@pytest.fixture()
def app_and_engine(pipeline):
    app, engine = make_app(pipeline)
    gate = Gate()
    engine.fault_hook = gate
    yield app, engine, gate
    gate.opened.set()
    engine.drain(5)


@pytest.fixture()
def client(app_and_engine) -> TestClient:
    return TestClient(app_and_engine[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, config: uvicorn.Config | None = None, send_buffer: int | None = None):
    """The app on a real uvicorn, on 127.0.0.1, in a background thread (`config`: one that says so).

    `send_buffer`: SO_SNDBUF of its connections. Small, a client that stops reading blocks the
    server's sends after kilobytes, not after the megabytes the kernel buffers on loopback.
    """
    config = config or uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None)
    port = config.port
    server = uvicorn.Server(config)
    sockets = None
    if send_buffer is not None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
        listener.bind((config.host, port))
        sockets = [listener]
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
