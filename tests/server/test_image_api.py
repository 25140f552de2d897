"""Image-to-image over HTTP: OpenAI's edits and variations (the real `openai` client on a real uvicorn),
/generate with an `image`, the refusals (each a 400 naming its field, or a 413), and image rows sharing
batches with plain ones."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.image_condition import fit_to
from model.schedules import ScaleSchedule
from model.vae import to_uint8
from tests.server.conftest import make_app, running_server, wait_until

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # the test server's default: 7 scales, 64x64 images
KEPT = slice(0, 32 - 3)  # columns outside the right-half mask, clear of the paste's feather


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


SOURCE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the schedule's size
SOURCE_PNG = encode(Image.fromarray(SOURCE))


def right_half_mask(size: tuple[int, int] = (64, 64), mode: str = "RGBA") -> bytes:
    """OpenAI's mask: opaque where the image is kept, fully transparent (alpha 0) on the right half."""
    alpha = np.full((size[1], size[0]), 255, np.uint8)
    alpha[:, size[0] // 2 :] = 0
    rgba = np.dstack([np.zeros((size[1], size[0], 3), np.uint8), alpha])
    return encode(Image.fromarray(rgba, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(rgba, "RGBA"))


def claims_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header says width x height (a decompression bomb costs its header only)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR: signature 8, length 4, type 4, then w, h
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def round_trip(pipeline, image: np.ndarray) -> np.ndarray:
    """The VAE's own round trip of an input (fitted as the engine fits it), as the model tests compute it."""
    fitted = np.array(fit_to(Image.fromarray(image), (64, 64), Image.Resampling.LANCZOS))
    pixels = torch.from_numpy(fitted).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        return to_uint8(pipeline.vae.reconstruct(pixels, SCHEDULE.vae_scales(False)))[0].numpy()


def generate(client, **body) -> np.ndarray:
    r = client.post("/generate", json={"prompt": "a red circle", "seed": 5, "tau": 1.0, **body})
    assert r.status_code == 200, r.text
    return decode(base64.b64decode(r.json()["images"][0]["b64"]))


# ---- the real openai client on a real server ------------------------------------------------------


@pytest.fixture()
def live(app_and_engine):
    app, engine, gate = app_and_engine
    with running_server(app) as url:
        yield url, engine, gate
    gate.opened.set()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_client_edits_with_a_mask_and_keeps_what_the_mask_does_not_cover(live):
    url, engine, gate = live
    r = sdk(url).images.edit(
        image=("in.png", SOURCE_PNG, "image/png"),
        mask=("mask.png", right_half_mask(), "image/png"),
        prompt="two blue squares",
        n=2,
        extra_body={"seed": 3, "cfg": [3.0] * 7, "tau": 1.0},
    )
    assert r.size == "64x64" and len(r.data) == 2 and r.usage is not None
    assert r.usage.input_tokens_details.image_tokens == 521 * 8  # the input, as the VAE encodes it
    for item in r.data:
        out = decode(base64.b64decode(item.b64_json or ""))
        assert np.array_equal(out[:, KEPT], SOURCE[:, KEPT])  # pasted back outside the mask
        assert not np.array_equal(out[:, 36:], SOURCE[:, 36:])  # repainted inside it
    metrics = httpx.get(f"{url}/metrics").text
    assert 'infinity_image_inputs_total{kind="edit",model="infinity-test"} 1.0' in metrics
    assert 'infinity_requests_total{endpoint="/v1/images/edits",status="2xx"} 1.0' in metrics


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks OpenAI's variations retired
def test_openai_client_creates_variations_as_urls(live):
    url, engine, gate = live
    r = sdk(url).images.create_variation(
        image=("in.png", SOURCE_PNG, "image/png"), n=2, response_format="url", extra_body={"seed": 1}
    )
    images = [decode(httpx.get(item.url or "").content) for item in r.data]
    assert [i.shape for i in images] == [(64, 64, 3)] * 2 and not np.array_equal(images[0], images[1])
    assert 'infinity_image_inputs_total{kind="variation",model="infinity-test"} 1.0' in httpx.get(f"{url}/metrics").text


def test_openai_client_streams_an_edit_with_partial_images(live):
    url, engine, gate = live
    stream = sdk(url).images.edit(
        image=("in.png", SOURCE_PNG, "image/png"),
        prompt="a green star",
        stream=True,
        partial_images=2,
        extra_body={"strength": 0.5, "seed": 2},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    assert decode(base64.b64decode(events[-1].b64_json)).shape == (64, 64, 3)


def test_openai_client_errors_name_the_field(live):
    url, engine, gate = live
    with pytest.raises(openai.BadRequestError) as err:
        sdk(url).images.edit(
            image=("in.png", SOURCE_PNG, "image/png"), mask=("m.png", SOURCE_PNG, "image/png"), prompt="x"
        )
    assert err.value.body["param"] == "mask" and err.value.body["code"] == "mask_without_alpha"  # type: ignore[index]


def test_an_image_request_cancelled_mid_generation_drops_its_rows(live):
    url, engine, gate = live
    gate.close()
    body = {"prompt": "running", "n": 2, "image": b64(SOURCE_PNG), "strength": 0.5}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/generate", json=body, timeout=0.5)
    running = 'infinity_cancelled_requests_total{model="infinity-test",stage="running"} 1.0'
    assert wait_until(lambda: running in httpx.get(f"{url}/metrics").text)
    gate.opened.set()
    assert engine.wait_idle(10)
    assert 'infinity_images_generated_total{model="infinity-test"} 0.0' in httpx.get(f"{url}/metrics").text


# ---- /generate --------------------------------------------------------------------------------------


def test_generate_edits_from_base64_and_data_urls_alike(client):
    mask = right_half_mask()
    plain = generate(client, image=b64(SOURCE_PNG), mask=b64(mask), strength=1.0)
    data_urls = generate(
        client, image="data:image/png;base64," + b64(SOURCE_PNG), mask="data:image/png;base64," + b64(mask)
    )  # strength defaults to 1 with a mask
    assert np.array_equal(plain, data_urls)
    assert np.array_equal(plain[:, KEPT], SOURCE[:, KEPT]) and not np.array_equal(plain[:, 36:], SOURCE[:, 36:])
    unpasted = generate(client, image=b64(SOURCE_PNG), mask=b64(mask), paste=False)
    assert not np.array_equal(unpasted[:, KEPT], SOURCE[:, KEPT])  # the decoder's pixels, not the input's


def test_strength_0_returns_the_vae_round_trip_and_1_ignores_the_input(client, pipeline):
    wide = np.repeat(SOURCE, 2, axis=1)  # 128 wide: snapped to the nearest template, fitted by the engine
    r = client.post("/generate", json={"prompt": "", "image": b64(encode(Image.fromarray(wide))), "strength": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["h_div_w"] == 0.5 and "image_encode" in body["timings"]  # the input's shape, not the default
    exact = generate(client, image=b64(SOURCE_PNG), strength=0.0, seed=1)
    assert np.array_equal(exact, round_trip(pipeline, SOURCE))
    assert np.array_equal(exact, generate(client, image=b64(SOURCE_PNG), strength=0.0, seed=2))  # seed-free
    ignored = generate(client, image=b64(SOURCE_PNG), strength=1.0)
    assert np.array_equal(ignored, generate(client))


def test_cmyk_jpegs_and_palette_pngs_are_converted_not_refused(client, pipeline):
    cmyk = Image.fromarray(SOURCE).convert("CMYK")
    out = generate(client, image=b64(encode(cmyk, "JPEG", quality=95)), strength=0.0)
    as_rgb = np.asarray(Image.open(io.BytesIO(encode(cmyk, "JPEG", quality=95))).convert("RGB"))
    assert np.array_equal(out, round_trip(pipeline, as_rgb))
    palette = Image.fromarray(SOURCE).convert("P", palette=Image.Palette.ADAPTIVE)
    out = generate(client, image=b64(encode(palette)), strength=0.0)
    assert np.array_equal(out, round_trip(pipeline, np.asarray(palette.convert("RGB"))))
    # A palette mask: its transparency (tRNS) marks the edit.
    mask = Image.new("P", (64, 64), 1)
    mask.putpalette([0, 0, 0, 255, 255, 255])
    mask.paste(0, (32, 0, 64, 64))
    out = generate(client, image=b64(SOURCE_PNG), mask=b64(encode(mask, transparency=0)))
    assert np.array_equal(out[:, KEPT], SOURCE[:, KEPT]) and not np.array_equal(out[:, 36:], SOURCE[:, 36:])


def test_generate_streams_previews_of_an_image_request(client):
    body = {"prompt": "a", "image": b64(SOURCE_PNG), "stream": True, "partial_images": 2}
    with client.stream("POST", "/generate", json=body) as r:
        text = "".join(r.iter_text())
    names = [block.split("\n")[0][7:] for block in text.strip().split("\n\n")]
    assert names == ["queued", "preview", "preview", "completed"]


# ---- refusals ---------------------------------------------------------------------------------------

TRUNCATED = SOURCE_PNG[: len(SOURCE_PNG) // 2]
REFUSED = [
    ({"image": b64(b"not an image at all")}, "image", "invalid_image"),
    ({"image": "%%% not base64"}, "image", "invalid_base64"),
    ({"image": b64(TRUNCATED)}, "image", "invalid_image"),
    ({"image": b64(animated("GIF"))}, "image", "animated_image"),
    ({"image": b64(animated("PNG"))}, "image", "animated_image"),
    ({"image": b64(claims_size(30000, 30000))}, "image", "image_too_large"),  # over PIL's own bomb cap
    ({"image": b64(claims_size(5000, 5000))}, "image", "image_too_large"),  # over ours only: never decoded
    ({"image": b64(SOURCE_PNG), "mask": b64(right_half_mask(mode="RGB"))}, "mask", "mask_without_alpha"),
    ({"image": b64(SOURCE_PNG), "mask": b64(right_half_mask((32, 32)))}, "mask", "mask_size_mismatch"),
    ({"image": b64(SOURCE_PNG), "mask": b64(encode(Image.new("RGBA", (64, 64), "white")))}, "mask", "empty_mask"),
    ({"image": b64(SOURCE_PNG), "mask": b64(claims_size(5000, 5000))}, "mask", "image_too_large"),
    ({"mask": b64(right_half_mask())}, "mask", "invalid_value"),
    ({"image": b64(SOURCE_PNG), "strength": 1.5}, "strength", "invalid_value"),
    ({"prompt": ""}, "prompt", "invalid_value"),
]


@pytest.mark.parametrize("fields,param,code", REFUSED)
def test_bad_images_get_400_naming_the_field_on_generate(client, fields, param, code):
    r = client.post("/generate", json={"prompt": "a", **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and param in error["message"], error


@pytest.mark.parametrize(
    "fields,param,code", [f for f in REFUSED if f[1] in ("image", "mask") and f[2] != "invalid_base64"]
)
def test_bad_images_get_400_naming_the_field_on_edits(client, fields, param, code):
    files = {k: ("f.png", base64.b64decode(v)) for k, v in fields.items()}
    if "image" not in files:
        param, code = "image", "missing"  # edits: the image is required first
    r = client.post("/v1/images/edits", data={"prompt": "a"}, files=files)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


@pytest.mark.parametrize(
    "path,data,files,param",
    [
        ("/v1/images/edits", {}, {"image": SOURCE_PNG}, "prompt"),
        ("/v1/images/edits", {"prompt": "a", "strength": "2"}, {"image": SOURCE_PNG}, "strength"),
        ("/v1/images/edits", {"prompt": "a", "n": "many"}, {"image": SOURCE_PNG}, "n"),
        ("/v1/images/edits", {"prompt": "a", "partial_images": "9"}, {"image": SOURCE_PNG}, "partial_images"),
        ("/v1/images/variations", {}, {"image": SOURCE_PNG, "mask": right_half_mask()}, "mask"),
        ("/v1/images/variations", {}, {}, "image"),
    ],
)
def test_bad_form_fields_get_400_naming_them(client, path, data, files, param):
    r = client.post(path, data=data, files={k: ("f.png", v) for k, v in files.items()} or None)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_body_limits_fit_uploads_while_text_endpoints_keep_theirs(pipeline):
    app, engine = make_app(pipeline, max_image_body_bytes=512 * 1024)
    try:
        client = TestClient(app)
        big = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)))
        assert 100_000 < len(big) < 300_000  # over the text limit (64 KiB), under the image one
        r = client.post("/v1/images/variations", files={"image": ("big.png", big)}, data={"seed": "1"})
        assert r.status_code == 200, r.text
        assert client.post("/generate", json={"image": b64(big), "strength": 0.5}).status_code == 200
        huge = big * 3  # over the image limit
        r = client.post("/v1/images/variations", files={"image": ("huge.png", huge)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # Text-only bodies of 100 KB: refused on every endpoint, /generate included (parsed or not).
        padded = b'{"prompt": "a"' + b" " * 100_000 + b"}"
        for path in ("/v1/images/generations", "/generate"):
            r = client.post(path, content=padded, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", path
        r = client.post("/generate", content=b"x" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = client.post("/generate", json={"prompt": "a", "cfg": "x" + " " * 100_000})
        assert r.status_code == 413  # a bad field of a text-only body: still too large first
    finally:
        engine.drain(5)


# ---- batching ---------------------------------------------------------------------------------------


def test_image_rows_share_a_batch_with_plain_ones_and_change_none_of_their_images(app_and_engine, client):
    app, engine, gate = app_and_engine
    image_body = {"prompt": "a green star", "seed": 4, "tau": 1.0, "image": b64(SOURCE_PNG), "strength": 0.4}
    alone = {"plain": generate(client, seed=1), "image": generate(client, **image_body)}
    batches: list[list[str]] = []

    def record(requests) -> None:
        batches.append(sorted("image" if r.condition is not None else "plain" for r in requests))
        gate(requests)

    engine.fault_hook = record
    gate.close()
    results: dict[str, np.ndarray] = {}
    blocker = threading.Thread(target=lambda: client.post("/generate", json={"prompt": "blocker"}))
    blocker.start()
    assert gate.entered.wait(10)
    threads = [
        threading.Thread(target=lambda: results.__setitem__("plain", generate(client, seed=1))),
        threading.Thread(target=lambda: results.__setitem__("image", generate(client, **image_body))),
    ]
    for t in threads:
        t.start()
    assert wait_until(lambda: engine.batcher.depth == 2)
    gate.opened.set()
    for t in [blocker, *threads]:
        t.join(60)
    assert batches[-1] == ["image", "plain"]  # one batch
    assert np.array_equal(results["plain"], alone["plain"]) and np.array_equal(results["image"], alone["image"])


def test_the_new_endpoints_are_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/images/edits", "/v1/images/variations"):
        schema = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert schema["properties"]["image"]["format"] == "binary" and "image" in schema["required"]
    assert (
        "mask"
        in paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    )


def test_an_image_request_waits_in_the_queue_and_leaves_it_on_its_deadline(app_and_engine, client):
    app, engine, gate = app_and_engine
    gate.close()
    blocker = threading.Thread(target=lambda: client.post("/generate", json={"prompt": "blocker"}))
    blocker.start()
    assert gate.entered.wait(10)
    start = time.monotonic()
    r = client.post(
        "/generate", json={"image": b64(SOURCE_PNG)}, headers={"x-stainless-read-timeout": "0.5"}
    )  # no prompt: a variation
    assert r.status_code == 504 and time.monotonic() - start < 5
    assert engine.batcher.depth == 0
    gate.opened.set()
    blocker.join(30)
