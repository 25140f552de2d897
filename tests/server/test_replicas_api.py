"""Replicas on the real engine and tiny real pipelines: two serving at once, one retiring, a warm-up that
fails, and torch's own out-of-memory error turned into a 503 after the batch is bisected.

Two replicas share the CPU here: the engine keys replicas by a name of their own (metrics labels,
thread names) and each pipeline carries its torch device, so "cpu:0" and "cpu:1" are two replicas
on one CPU.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from model.pipeline import InfinityPipeline
from model.text_encoder import T5TextEncoder
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.settings import Settings
from tests.server.conftest import LIMITS, Gate, make_app, wait_until

OUT_OF_MEMORY = torch.OutOfMemoryError  # the real class, whatever a test does to the name later


class ThreadKill(BaseException):
    """Escapes every `except Exception`: what a fatal error inside a worker looks like."""


@pytest.fixture()
def fresh_pipeline(t5_dir, tiny_transformer, tiny_vae):
    """A pipeline of its own, to break without touching the shared one."""

    def build() -> InfinityPipeline:
        return InfinityPipeline(
            copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir)
        )

    return build


class Held:
    """A fault hook that holds every batch in its worker until released, noting which replica took
    which prompts; the worker of replica `kill`, if given, dies instead."""

    def __init__(self, kill: str | None = None) -> None:
        self.kill = kill
        self.taken: list[tuple[str, list[str]]] = []  # (replica, prompts of the batch)
        self.release = threading.Event()
        self._changed = threading.Condition()

    def __call__(self, requests) -> None:
        device = threading.current_thread().name.removeprefix("replica-")
        with self._changed:
            self.taken.append((device, [r.prompt for r in requests]))
            self._changed.notify_all()
        if device == self.kill:
            raise ThreadKill()
        assert self.release.wait(30), "never released"

    def wait_for(self, batches: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.taken) >= batches, timeout=10)


def post_in_thread(client: TestClient, results: dict, name: str, **body) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: results.__setitem__(name, client.post("/generate", json={"prompt": name, **body}))
    )
    thread.start()
    return thread


def samples(client: TestClient, prefix: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    }


def test_two_replicas_serve_at_once_and_one_retiring_leaves_the_other_serving(pipeline, fresh_pipeline):
    engine = Engine(
        {"cpu:0": pipeline, "cpu:1": fresh_pipeline()},
        Metrics().for_model(LIMITS.name),
        max_batch_size=4,
        max_wait_ms=0,
        max_queue=8,
        worker_restarts=0,
    )
    engine.start()
    client = TestClient(create_app(Settings(max_batch_size=4, max_n=4, max_queue=8, warmup=False), engine, LIMITS))
    try:
        held = Held()
        engine.fault_hook = held
        results: dict = {}
        threads = [post_in_thread(client, results, "a red circle")]
        assert held.wait_for(1)  # one replica holds it ...
        threads.append(post_in_thread(client, results, "a blue square"))
        assert held.wait_for(2)  # ... so the other took the second, at the same time
        assert sorted(device for device, _ in held.taken) == ["cpu:0", "cpu:1"]
        held.release.set()
        for t in threads:
            t.join(30)
        assert [results[n].status_code for n in ("a red circle", "a blue square")] == [200, 200]
        lookups = samples(client, "infinity_text_cache_lookups_total{")  # per replica: each encoded a prompt
        assert {d: sum(v for k, v in lookups.items() if f'device="{d}"' in k) for d in ("cpu:0", "cpu:1")} == {
            "cpu:0": 1.0,
            "cpu:1": 1.0,
        }, lookups

        # cpu:0's worker dies with the next batch it takes; with no restarts allowed it retires.
        dying = Held(kill="cpu:0")
        engine.fault_hook = dying
        threads = [post_in_thread(client, results, "first")]
        assert dying.wait_for(1)
        if dying.taken[0][0] == "cpu:1":  # held there: the next one can only go to cpu:0
            threads.append(post_in_thread(client, results, "second"))
            assert dying.wait_for(2)
        assert wait_until(lambda: engine.replicas[0].health.retired)
        dying.release.set()
        for t in threads:
            t.join(30)
        for device, (prompt,) in dying.taken:
            assert results[prompt].status_code == (500 if device == "cpu:0" else 200), (device, results[prompt].text)
        engine.fault_hook = None
        for i in range(3):  # cpu:1 serves on
            assert client.post("/generate", json={"prompt": "a green star", "seed": i}).status_code == 200
        assert client.get("/readyz").status_code == 200 and client.get("/healthz").status_code == 200
        assert samples(client, "infinity_replica_up{") == {
            'infinity_replica_up{device="cpu:0",model="infinity-test"}': 0.0,
            'infinity_replica_up{device="cpu:1",model="infinity-test"}': 1.0,
        }
        assert samples(client, "infinity_worker_deaths_total{") == {
            'infinity_worker_deaths_total{device="cpu:0",model="infinity-test"}': 1.0,
            'infinity_worker_deaths_total{device="cpu:1",model="infinity-test"}': 0.0,  # exported from the start
        }
    finally:
        engine.drain(5)


def test_a_warm_up_that_fails_names_its_replica_and_the_server_is_not_ready(fresh_pipeline):
    good, bad = fresh_pipeline(), fresh_pipeline()

    def fault(*args, **kwargs):
        raise RuntimeError("injected: a kernel that fails on this device")

    bad.transformer.blocks[0].forward = fault
    engine = Engine(
        {"cpu:good": good, "cpu:bad": bad},
        Metrics().for_model(LIMITS.name),
        max_batch_size=4,
        max_wait_ms=0,
        max_queue=8,
    )
    try:
        with pytest.raises(RuntimeError, match="warm-up failed") as err:
            engine.start(warmup=LIMITS.warmup_schedule)
        assert "cpu:bad" in str(err.value) and "cpu:good" not in str(err.value)
        assert not engine.ready
        client = TestClient(create_app(Settings(max_batch_size=4, max_n=4, max_queue=8, warmup=False), engine, LIMITS))
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = client.post("/generate", json={"prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert 'infinity_ready{model="infinity-test"} 0.0' in client.get("/metrics").text
    finally:
        engine.drain(2)


# four queued images form one batch after the blocker, split twice (continuous: max_batch_size counts the
# rows in flight, and the cohorts, so the splits, depend on the order the threads' requests arrive in)
@pytest.mark.static_batching
def test_torchs_out_of_memory_error_fails_only_the_request_too_big_after_the_bisect(pipeline, monkeypatch):
    """The first block raises torch.OutOfMemoryError itself, inside the real generate, whenever it
    sees more rows than one image needs: the pipeline's conversion to DeviceOutOfMemory is what makes
    the replica split the batch and answer 503 out_of_memory (any other error would be a 500)."""
    block = pipeline.transformer.blocks[0]
    forward, widest = block.forward, []

    def measured(x, *args, **kwargs):
        widest.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(block, "forward", measured)
    app, engine = make_app(pipeline)
    gate = Gate()
    engine.fault_hook = gate
    try:
        client = TestClient(app)
        assert client.post("/generate", json={"prompt": "one image", "seed": 1}).status_code == 200
        one_image = max(widest)  # rows a single image runs with (two with guidance)

        def out_of_memory(x, *args, **kwargs):
            if x.shape[0] > one_image:
                raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            return forward(x, *args, **kwargs)

        gate.close()
        results: dict = {}
        threads = [post_in_thread(client, results, "blocker")]
        assert gate.entered.wait(10)
        monkeypatch.setattr(block, "forward", out_of_memory)
        threads += [
            post_in_thread(client, results, "two images", n=2),
            post_in_thread(client, results, "one", seed=2),
            post_in_thread(client, results, "another", seed=3),
        ]
        assert wait_until(lambda: engine.queue_depth == 4)  # one batch of 4 images, all too big together
        gate.opened.set()
        for t in threads:
            t.join(30)
        assert {name: r.status_code for name, r in results.items()} == {
            "blocker": 200,
            "two images": 503,
            "one": 200,
            "another": 200,
        }, {n: r.text[:200] for n, r in results.items()}
        r = results["two images"]
        assert r.json()["error"]["code"] == "out_of_memory" and r.headers["retry-after"] == "10"
        assert "20.00 GiB" not in r.text  # the device's message stays in the log
        text = client.get("/metrics").text
        model = 'model="infinity-test"'
        assert f'infinity_errors_total{{{model},reason="out_of_memory"}} 1.0' in text
        assert f'infinity_batch_splits_total{{{model},reason="out_of_memory"}} 2.0' in text  # 4 -> 2 + 2 -> 1 + 1
        assert f'infinity_errors_total{{{model},reason="generation"}} 0.0' in text
        assert f'infinity_batch_splits_total{{{model},reason="generation"}} 0.0' in text
    finally:
        gate.opened.set()
        engine.drain(5)
