"""One client's request can never fail or change another's: poisoned rows and failing requests fail alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.config import SamplingParams
from model.schedules import ScaleSchedule
from server.engine import Engine, GenerationRequest
from server.errors import ServingError
from tests.server.conftest import Gate, make_app

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")
NORMAL = [("a red circle", 1), ("a blue square", 2), ("a green star", 3)]


def _request(prompt: str, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(f"req-{prompt}", prompt, SCHEDULE, (params,), time.monotonic() + 60)


def _alone(engine: Engine) -> dict[str, np.ndarray]:
    return {
        p: engine.submit(_request(p, SamplingParams(tau=1.0, seed=s))).future.result(30).images[0] for p, s in NORMAL
    }


def _in_one_batch(engine: Engine, gate: Gate, extra: GenerationRequest) -> list:
    """The normal requests and `extra` queued behind a held batch, so that they run as one batch."""
    gate.close()
    blocker = engine.submit(_request("blocker", SamplingParams(seed=0)))
    assert gate.entered.wait(10)
    tickets = [engine.submit(_request(p, SamplingParams(tau=1.0, seed=s))) for p, s in NORMAL[:2]]
    tickets.append(engine.submit(extra))
    tickets.append(engine.submit(_request(NORMAL[2][0], SamplingParams(tau=1.0, seed=NORMAL[2][1]))))
    deadline = time.monotonic() + 10
    while engine.batcher.depth < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.opened.set()
    blocker.future.result(30)
    return tickets


@pytest.fixture()
def held_engine(pipeline):
    app, engine = make_app(pipeline, max_batch_size=8, max_n=4, max_queue=64)
    gate = Gate()
    engine.fault_hook = gate
    yield app, engine, gate
    gate.opened.set()
    engine.drain(5)


@pytest.mark.parametrize(
    "poison",
    [SamplingParams(tau=1e-38, seed=9), SamplingParams(cfg=1e38, seed=9), SamplingParams(cfg=1e20, tau=1e-20, seed=9)],
)
def test_a_row_with_non_finite_logits_fails_alone(held_engine, poison):
    app, engine, gate = held_engine
    alone = _alone(engine)
    tickets = _in_one_batch(engine, gate, _request("poison", poison))
    bad = tickets.pop(2)
    with pytest.raises(ServingError) as caught:
        bad.future.result(30)
    assert caught.value.status == 422 and caught.value.code == "non_finite_logits"
    for ticket, (prompt, _) in zip(tickets, NORMAL, strict=True):
        out = ticket.future.result(30)
        assert np.array_equal(out.images[0], alone[prompt]), prompt
    value, model = engine.metrics.owner.registry.get_sample_value, {"model": "infinity-test"}
    batches, of_three_or_fewer = "infinity_batch_size_images_count", "infinity_batch_size_images_bucket"
    assert value(batches, model) > value(of_three_or_fewer, {**model, "le": "3.0"})  # they did share a batch
    text = TestClient(app).get("/metrics").text
    assert 'infinity_errors_total{model="infinity-test",reason="non_finite_logits"} 1.0' in text


def test_a_failing_request_is_bisected_out_of_its_batch(held_engine):
    app, engine, gate = held_engine
    alone = _alone(engine)
    hold = engine.fault_hook

    def fail_with_poison(requests):
        hold(requests)
        if any(r.prompt == "poison" for r in requests):
            raise RuntimeError("injected: this request cannot run")

    engine.fault_hook = fail_with_poison
    tickets = _in_one_batch(engine, gate, _request("poison", SamplingParams(seed=9)))
    bad = tickets.pop(2)
    with pytest.raises(ServingError) as caught:
        bad.future.result(30)
    assert caught.value.status == 500 and caught.value.code == "generation_failed"
    for ticket, (prompt, _) in zip(tickets, NORMAL, strict=True):
        assert np.array_equal(ticket.future.result(30).images[0], alone[prompt]), prompt
    text = TestClient(app).get("/metrics").text
    # 4 requests: [a b | poison c] -> [poison | c] -> poison alone fails: two splits, one error
    assert 'infinity_batch_splits_total{model="infinity-test",reason="generation"} 2.0' in text
    assert 'infinity_errors_total{model="infinity-test",reason="generation"} 1.0' in text


EXTREMES = [
    {"cfg": 30.000001},
    {"cfg": 1e308},
    {"cfg": -1e308},
    {"tau": 1e-300},
    {"tau": 5e-324},
    {"tau": 1e308},
    {"cfg": [3.0] * 6 + [1e300]},
    {"tau": [1.0] * 6 + [1e-300]},
    {"top_p": 1.0000001},
    {"top_k": 10**18},
    {"seed": 2**63},
    {"n": 10**18},
    {"width": 10**9, "height": 1},
    {"partial_images": 10**9, "stream": True},
    {"aspect_ratio": "1e308:1"},
    {"pn": "1e308M"},
]


def test_extreme_values_of_every_numeric_field_never_touch_concurrent_requests(held_engine):
    app, engine, gate = held_engine
    client = TestClient(app)

    def post(body: dict, out: dict, key) -> threading.Thread:
        t = threading.Thread(target=lambda: out.__setitem__(key, client.post("/generate", json=body)))
        t.start()
        return t

    solo = {
        s: client.post("/generate", json={"prompt": p, "seed": s, "tau": 1.0}).json()["images"][0]["b64"]
        for p, s in NORMAL
    }
    results: dict = {}
    threads = []
    for i, extreme in enumerate(EXTREMES):
        threads.append(post({"prompt": "x", **extreme}, results, ("extreme", i)))
        p, s = NORMAL[i % 3]
        threads.append(post({"prompt": p, "seed": s, "tau": 1.0}, results, ("normal", i)))
    for t in threads:
        t.join(60)
    for i, extreme in enumerate(EXTREMES):
        r = results[("extreme", i)]
        assert 400 <= r.status_code < 500, (extreme, r.status_code, r.text)
        assert r.json()["error"]["param"] == next(iter(extreme)), (extreme, r.text)
        normal = results[("normal", i)]
        assert normal.status_code == 200, normal.text
        image = normal.json()["images"][0]
        assert image["b64"] == solo[image["seed"]]
