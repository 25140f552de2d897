"""A replica's worker thread dying: its batch fails, it is restarted, past its budget the server is not-ready."""

from __future__ import annotations

import copy
import threading
import time

import pytest
from fastapi.testclient import TestClient

from model.pipeline import InfinityPipeline
from model.text_encoder import T5TextEncoder
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings
from tests.server.conftest import LIMITS, Gate, make_app


class ThreadKill(BaseException):
    """Escapes every `except Exception`: what a fatal error inside the worker looks like."""


def _kill_once():
    fired = []

    def hook(requests):
        if not fired:
            fired.append(True)
            raise ThreadKill()

    return hook


def _metric(client: TestClient, line: str) -> bool:
    return line in client.get("/metrics").text


def test_a_dead_worker_fails_its_batch_and_is_restarted(pipeline):
    app, engine = make_app(pipeline)
    try:
        c = TestClient(app)
        engine.fault_hook = _kill_once()
        start = time.monotonic()
        r = c.post("/generate", json={"prompt": "a"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert time.monotonic() - start < 10 and "ThreadKill" not in r.text
        assert c.post("/generate", json={"prompt": "a"}).status_code == 200  # served by the new thread
        assert c.get("/readyz").status_code == 200
        assert _metric(c, 'infinity_worker_deaths_total{device="cpu",model="infinity-test"} 1.0')
        assert _metric(c, 'infinity_worker_restarts_total{device="cpu",model="infinity-test"} 1.0')
    finally:
        engine.drain(5)


# the running batch outlives a death in the next one (continuous: a death fails every request in flight on
# the replica, all of it on that worker thread)
@pytest.mark.static_batching
def test_past_its_restart_budget_the_server_is_not_ready_and_nothing_waits(pipeline):
    app, engine = make_app(pipeline, worker_restarts=0)
    gate = Gate()
    try:
        c = TestClient(app)
        gate.close()
        engine.fault_hook = gate
        results: dict[str, object] = {}

        def post(name: str, **extra) -> threading.Thread:
            body = {"prompt": name, **extra}
            t = threading.Thread(target=lambda: results.__setitem__(name, c.post("/generate", json=body)))
            t.start()
            return t

        threads = [post("running")]
        assert gate.entered.wait(10)  # a batch is held inside the worker
        for name, extra in (("next", {}), ("other-size", {"aspect_ratio": "2:1"})):  # two batches, in order
            threads.append(post(name, **extra))
            deadline, depth = time.monotonic() + 10, len(threads) - 1
            while engine.batcher.depth < depth and time.monotonic() < deadline:
                time.sleep(0.01)

        def die(requests):
            raise ThreadKill()

        engine.fault_hook = die  # the next batch taken kills the thread for good
        gate.opened.set()
        for t in threads:
            t.join(20)
            assert not t.is_alive(), "a request waited forever"
        assert results["running"].status_code == 200  # already past the hook: it finishes
        assert results["next"].status_code == 500  # the batch the thread died with
        queued = results["other-size"]  # still queued when no worker was left
        assert queued.status_code == 503 and queued.json()["error"]["code"] == "not_ready"
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = c.post("/generate", json={"prompt": "after"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert _metric(c, 'infinity_worker_deaths_total{device="cpu",model="infinity-test"} 1.0')
        assert _metric(c, 'infinity_worker_restarts_total{device="cpu",model="infinity-test"} 0.0')
        assert _metric(c, 'infinity_ready{model="infinity-test"} 0.0')
        assert _metric(c, 'infinity_replica_up{device="cpu",model="infinity-test"} 0.0')
        r = c.get("/healthz")  # liveness fails: the orchestrator restarts the pod
        assert r.status_code == 503 and r.json()["status"] == "broken"
    finally:
        engine.drain(2)


def test_one_dead_replica_of_two_leaves_the_server_ready_and_serving(pipeline, t5_dir, tiny_transformer, tiny_vae):
    second = InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))
    settings = Settings(max_batch_size=4, max_n=4, max_queue=8, warmup=False, worker_restarts=0)
    engine = Engine({"cpu": pipeline, "cpu-b": second}, Metrics().for_model(LIMITS.name), 4, 0, 8, None, 0)
    engine.start()
    c = TestClient(create_app(settings, engine, LIMITS))
    try:
        engine.fault_hook = _kill_once()
        assert c.post("/generate", json={"prompt": "a"}).status_code == 500  # its replica is retired
        for _ in range(3):
            assert c.post("/generate", json={"prompt": "a"}).status_code == 200  # the other one serves
        assert c.get("/readyz").status_code == 200 and c.get("/healthz").status_code == 200
        up = {line for line in c.get("/metrics").text.splitlines() if line.startswith("infinity_replica_up{")}
        assert sorted(line.split()[-1] for line in up) == ["0.0", "1.0"], up
        assert _metric(c, 'infinity_ready{model="infinity-test"} 1.0')
    finally:
        engine.drain(2)
