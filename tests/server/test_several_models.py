"""Several models in one server (server/models.py): each request reaches the model it names, each
model has its own engine, and the real `serve --models` process serves two real models at once."""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.pipeline import InfinityPipeline
from model.text_encoder import T5TextEncoder
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.models import ServedModel, ServedModels
from server.service import ModelLimits
from server.settings import Settings
from tests.server.conftest import Gate, wait_until
from tests.server.test_lifecycle import _start_serve
from tests.server.test_metrics import sample
from weights.default import DEFAULT_DIR


@pytest.fixture(scope="module")
def other_pipeline(t5_dir, tiny_transformer, tiny_vae) -> InfinityPipeline:
    return InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))


@pytest.fixture()
def two_models(pipeline, other_pipeline):
    """ "small" (0.06M, the first: the default) and "large" (up to 0.25M), each with its own engine."""
    settings = Settings(max_batch_size=4, max_n=2, max_wait_ms=10, max_queue=4, warmup=False)
    models = _served({"small": pipeline, "large": other_pipeline})
    yield TestClient(create_app(settings, models)), {m.name: m.engine for m in models}
    models.drain(5)


def _served(pipelines: dict[str, InfinityPipeline]) -> ServedModels:
    """ "small" (0.06M, the first: the default) and "large" (up to 0.25M), each with its own engine,
    on one metrics registry."""
    metrics = Metrics()
    engines = {name: Engine({"cpu": p}, metrics.for_model(name), max_queue=4) for name, p in pipelines.items()}
    for engine in engines.values():
        engine.start()
    return ServedModels(
        [
            ServedModel(ModelLimits("small", "0.06M", "0.06M"), engines["small"]),
            ServedModel(ModelLimits("large", "0.25M", "0.25M"), engines["large"]),
        ]
    )


def test_each_request_reaches_the_model_it_names_and_the_first_serves_the_rest(two_models):
    client, _ = two_models
    unnamed = client.post("/generate", json={"prompt": "a", "seed": 1}).json()
    large = client.post("/generate", json={"prompt": "a", "seed": 1, "model": "large"}).json()
    assert unnamed["model"] == "small" and unnamed["pn"] == "0.06M"
    assert large["model"] == "large" and large["pn"] == "0.25M" and large["width"] > unnamed["width"]
    openai_large = client.post("/v1/images/generations", json={"prompt": "a", "model": "large"}).json()
    assert openai_large["size"] == f"{large['width']}x{large['height']}"


def test_an_unknown_model_is_404_naming_the_served_ones(two_models):
    client, _ = two_models
    for path in ("/generate", "/v1/images/generations"):
        r = client.post(path, json={"prompt": "a", "model": "dall-e-3"})
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "'dall-e-3'" in error["message"] and "['small', 'large']" in error["message"]


def test_the_edits_and_variations_model_form_field_picks_the_model(two_models):
    client, _ = two_models
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    r = client.post("/v1/images/variations", data={"model": "large", "size": "256x256"}, files=files)
    assert r.status_code == 200, r.text
    r = client.post("/v1/images/edits", data={"model": "nope", "prompt": "a"}, files=files)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # the model is checked before the upload is read: an unknown model with a broken image is a 404
    broken = {"image": ("in.png", b"not a png", "image/png")}
    for path in ("/v1/images/edits", "/v1/images/variations"):
        r = client.post(path, data={"model": "nope", "prompt": "a"}, files=broken)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (path, r.text)


def test_models_lists_each_with_what_it_can_make(two_models):
    client, _ = two_models
    small, large = client.get("/v1/models").json()["data"]
    assert (small["id"], large["id"]) == ("small", "large")
    assert small["pixel_budgets"] == ["0.06M"] and large["pixel_budgets"] == ["0.06M", "0.25M"]
    assert large["default_pn"] == "0.25M" and small["token_bits"] == 8
    assert set(small["sizes"]) < set(large["sizes"])


def test_a_held_model_neither_delays_nor_fails_another(two_models):
    client, engines = two_models
    gate = Gate()
    engines["small"].fault_hook = gate
    gate.close()
    held = threading.Thread(target=lambda: client.post("/generate", json={"prompt": "held"}))
    held.start()
    try:
        assert gate.entered.wait(10)  # the small model's worker is busy, its queue waits behind it
        r = client.post("/generate", json={"prompt": "a", "model": "large"})
        assert r.status_code == 200 and r.json()["model"] == "large"
    finally:
        gate.opened.set()
        held.join(30)

    def fail(requests):
        raise RuntimeError("injected")

    engines["small"].fault_hook = fail
    assert client.post("/generate", json={"prompt": "a"}).status_code == 500
    assert client.post("/generate", json={"prompt": "a", "model": "large"}).status_code == 200
    ready = client.get("/readyz").json()
    assert ready == {"ready": True, "model": "small", "models": {"small": True, "large": True}}


def test_readyz_is_ready_only_when_every_model_is(two_models):
    client, engines = two_models
    engines["large"].stop_admitting()
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["models"] == {"small": True, "large": False}
    assert client.post("/generate", json={"prompt": "a"}).status_code == 200  # the other still serves


# ---- metrics: each model's own series --------------------------------------------------------


def _value(client: TestClient, name: str, model: str, **labels: str) -> float:
    value = sample(client.get("/metrics").text, name, model=model, **labels)
    assert value is not None, f"no {name} for {model}"
    return value


def _both(client: TestClient, name: str) -> tuple[float, float]:
    return _value(client, name, "small"), _value(client, name, "large")


def test_each_model_has_its_own_series_and_traffic_to_one_moves_only_its_own(two_models):
    client, engines = two_models
    # exported from the start, before any request
    assert _both(client, "infinity_ready") == (1, 1)
    assert _both(client, "infinity_images_generated_total") == (0, 0)
    assert _both(client, "infinity_queue_depth") == (0, 0)
    gate = Gate()
    engines["small"].fault_hook = gate
    gate.close()
    held = [
        threading.Thread(target=lambda body=body: client.post("/generate", json=body))
        for body in ({"prompt": "held"}, {"prompt": "queued", "n": 2})
    ]
    held[0].start()
    try:
        assert gate.entered.wait(10)  # small's worker runs one image ...
        held[1].start()
        assert wait_until(lambda: engines["small"].queue_depth == 2)  # ... and two wait behind it
        assert _both(client, "infinity_queue_depth") == (2, 0)
        assert _both(client, "infinity_running_rows") == (1, 0)
        assert client.post("/generate", json={"prompt": "a", "model": "large"}).status_code == 200
        assert _both(client, "infinity_images_generated_total") == (0, 1)  # small's is still held
        assert _both(client, "infinity_batch_size_images_count") == (1, 1)
    finally:
        gate.opened.set()
        for t in held:
            t.join(30)
    assert _both(client, "infinity_images_generated_total") == (3, 1)
    assert _both(client, "infinity_queue_depth") == (0, 0)
    engines["large"].stop_admitting()
    assert _both(client, "infinity_ready") == (1, 0)


def test_models_sharing_a_text_encoder_count_each_cache_lookup_once(pipeline, tiny_transformer, tiny_vae):
    """Models that name the same T5 share its cache (weights/text_encoders.py): a lookup counts once,
    under the model whose request made it, not once per model."""
    shared = InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), pipeline.text_encoder)
    models = _served({"small": pipeline, "large": shared})
    client = TestClient(create_app(Settings(max_n=2, max_wait_ms=10, warmup=False), models))
    try:
        prompt = "a prompt no other test of this module sends"
        assert client.post("/generate", json={"prompt": prompt}).status_code == 200
        assert client.post("/generate", json={"prompt": prompt, "model": "large"}).status_code == 200
        lookups = {
            (model, result): _value(client, "infinity_text_cache_lookups_total", model, result=result)
            for model in ("small", "large")
            for result in ("hit", "miss")
        }
        assert lookups == {("small", "hit"): 0, ("small", "miss"): 1, ("large", "hit"): 1, ("large", "miss"): 0}
    finally:
        models.drain(5)


# ---- the real `infinity-serve serve --models` process -----------------------------------------


def _models_file(tmp_path: Path, official_files, t5_dir) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        f"""
[[models]]
name = "infinity-default"
weights = "{DEFAULT_DIR}"

[[models]]
name = "tiny-official"
transformer = "{official_files["transformer"]}"
vae = "{official_files["vae"]}"
text_encoder = "{t5_dir}"
default_pn = "0.06M"
max_pn = "0.25M"
"""
    )
    return path


def test_serve_two_real_models_with_concurrent_traffic(tmp_path, official_files, t5_dir):
    env = {"INFINITY_MAX_BATCH_SIZE": "4", "INFINITY_MAX_N": "2", "HF_HUB_OFFLINE": "1"}
    models = _models_file(tmp_path, official_files, t5_dir)
    proc, url = _start_serve(["-m", "server.cli", "serve", "--models", str(models)], env)
    try:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["models"] == {"infinity-default": True, "tiny-official": True}
        results: dict[str, list[dict]] = {"infinity-default": [], "tiny-official": []}

        def send(model: str, seed: int) -> None:
            body = {"prompt": "a red circle", "seed": seed, "model": model}
            if model == "tiny-official":
                body["pn"] = "0.25M"
            r = httpx.post(f"{url}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            results[model].append(r.json())

        threads = [threading.Thread(target=send, args=(m, s)) for s in range(3) for m in results]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        default, tiny = results["infinity-default"], results["tiny-official"]
        assert len(default) == len(tiny) == 3
        assert all((b["model"], b["width"], b["pn"]) == ("infinity-default", 64, "custom") for b in default)
        assert all(b["model"] == "tiny-official" and b["pn"] == "0.25M" and b["width"] > 64 for b in tiny)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == ["infinity-default", "tiny-official"]
        with pytest.raises(openai.NotFoundError) as err:
            client.images.generate(model="dall-e-3", prompt="a")
        assert err.value.body["code"] == "model_not_found"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert "loading model infinity-default" in output and "loading model tiny-official" in output


def test_serve_refuses_a_models_file_with_errors_naming_the_field(tmp_path, official_files, t5_dir):
    models = _models_file(tmp_path, official_files, t5_dir)
    models.write_text(models.read_text() + 'max_batch_size = "big"\n')
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        env={**os.environ, "INFINITY_MODELS_FILE": str(models)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "[[models]] entry 2 ('tiny-official'): `max_batch_size`" in done.stderr + done.stdout
