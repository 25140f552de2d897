"""The playground's model picker: each served model's options on its `/v1/models` card, then the page
in headless Chromium against the real `serve --models` process serving two real models (the default
one, 64x64 only, and a tiny official-format one with every template at 0.06M and 0.25M), behind a key."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from model.schedules import TEMPLATES, ScaleSchedule, nearest_template
from server.app import create_app
from server.models import ServedModel, ServedModels
from server.protocol import parse_aspect_ratio
from server.service import ModelLimits
from tests.server import test_playground as playground
from tests.server import test_several_models as several
from tests.server.browser import console_errors
from tests.server.conftest import make_app
from tests.server.test_lifecycle import _start_serve
from tests.server.test_playground import KEY, assert_final_image, open_page, wait
from tests.server.test_playground_image import RECORD_REQUESTS, generate_and_wait, picture, png_bytes, sent_bodies

# Headless Chromium, and two models in one process (in-process: "small" and "large").
browser, other_pipeline, two_models = playground.browser, several.other_pipeline, several.two_models
AUTH = {"authorization": f"Bearer {KEY}"}
DEFAULT, TINY = "infinity-default", "tiny-official"


# ---- the cards: what each model offers, in the terms the page uses ---------------------------------


def test_each_card_gives_the_size_of_every_template_at_every_budget(two_models):
    client, _ = two_models
    cards = client.get("/v1/models").json()["data"]
    for card in cards:
        templates = card["templates"]
        assert sorted(t["h_div_w"] for t in templates) == sorted(TEMPLATES)
        assert all(list(t["sizes"]) == card["pixel_budgets"] for t in templates)
        assert {s for t in templates for s in t["sizes"].values()} == set(card["sizes"])  # the same sizes, placed
        for t in templates:  # the label the page sends snaps back to its own template
            assert nearest_template(parse_aspect_ratio(t["aspect_ratio"])) == t["h_div_w"]
    large = {t["aspect_ratio"]: t["sizes"] for t in cards[1]["templates"]}
    r = client.post("/generate", json={"prompt": "a", "model": "large", "aspect_ratio": "2:1", "pn": "0.25M"})
    assert large["2:1"]["0.25M"] == f"{r.json()['width']}x{r.json()['height']}"
    # The playground's config describes the first model in the same terms.
    config = client.get("/playground/config").json()
    small = {t["aspect_ratio"]: t["sizes"] for t in cards[0]["templates"]}
    assert {
        t["aspect_ratio"]: {pn: "x".join(map(str, s)) for pn, s in t["sizes"].items()} for t in config["templates"]
    } == small


def test_a_one_size_model_offers_no_template(pipeline):
    app, engine = make_app(pipeline)
    try:
        limits = ModelLimits("one-size", "0.06M", "0.06M", ScaleSchedule.custom(((1, 1), (2, 2), (4, 4))))
        models = ServedModels([ServedModel(limits, engine)])
        (card,) = TestClient(create_app(app.state.settings, models)).get("/v1/models").json()["data"]
        assert (card["sizes"], card["pixel_budgets"], card["templates"]) == (["16x16"], ["custom"], [])
    finally:
        engine.drain(5)


# ---- in the browser, against the real `serve --models` process --------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, official_files, t5_dir):
    """`serve --models` with the default model first (so the page starts on it) and the tiny one, a key."""
    models = several._models_file(tmp_path_factory.mktemp("models"), official_files, t5_dir)
    env = {
        "INFINITY_MAX_BATCH_SIZE": "4",
        "INFINITY_MAX_N": "2",
        "INFINITY_API_KEYS": json.dumps([KEY]),
        "HF_HUB_OFFLINE": "1",
    }
    proc, url = _start_serve(["-m", "server.cli", "serve", "--models", str(models)], env)
    try:
        cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]}
        yield url, cards
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def options(driver, element_id: str) -> list[str]:
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).options].map(o => o.value)", element_id
    )


def aspects(driver) -> list[str]:
    return [r.get_attribute("value") for r in driver.find_elements(By.CSS_SELECTOR, "input[name=aspect]")]


def pick(driver, name: str) -> None:
    """Choose a model by the keyboard, as a person would: focus the picker, arrow to it."""
    select = driver.find_element(By.ID, "model")
    select.send_keys(Keys.HOME)
    for _ in options(driver, "model"):
        if select.get_attribute("value") == name:
            return
        select.send_keys(Keys.ARROW_DOWN)
    assert select.get_attribute("value") == name, options(driver, "model")


def shown_size(driver) -> str:
    return driver.find_element(By.ID, "size-hint").text


def test_without_the_key_the_picker_shows_the_first_model_then_every_one(served, browser):
    url, _ = served
    driver = open_page(browser, url, key=None)
    picker = driver.find_element(By.ID, "model")
    wait(driver, lambda: "Enter the API key" in driver.find_element(By.ID, "model-hint").text)
    assert options(driver, "model") == [DEFAULT] and not picker.is_enabled()  # named, nothing to choose yet
    assert driver.find_element(By.ID, "model-line").text.startswith(f"Model {DEFAULT} · 64×64 images")  # noqa: RUF001
    assert aspects(driver) == [] and not driver.find_element(By.ID, "pn").is_enabled()
    assert shown_size(driver) == "This model makes one size only: 64×64 pixels."  # noqa: RUF001

    driver.find_element(By.ID, "api-key").send_keys(KEY)  # the key lists them all
    wait(driver, lambda: options(driver, "model") == [DEFAULT, TINY])
    assert picker.is_enabled() and picker.get_attribute("value") == DEFAULT
    assert driver.find_element(By.ID, "model-hint").text == "2 models here, each with its own sizes."
    assert picker.accessible_name == "Model"
    assert console_errors(driver) == []


def test_the_chosen_model_offers_its_sizes_and_gets_every_request(served, browser, tmp_path):
    url, cards = served
    tiny = {t["aspect_ratio"]: t["sizes"] for t in cards[TINY]["templates"]}
    driver = open_page(browser, url)
    wait(driver, lambda: options(driver, "model") == [DEFAULT, TINY])
    assert options(driver, "pn") == cards[DEFAULT]["pixel_budgets"] == ["custom"] and aspects(driver) == []

    pick(driver, TINY)
    assert driver.find_element(By.ID, "model-line").text.startswith(f"Model {TINY} · up to 2 images")
    assert options(driver, "pn") == cards[TINY]["pixel_budgets"] == ["0.06M", "0.25M"]
    pn = driver.find_element(By.ID, "pn")
    assert pn.is_enabled() and pn.get_attribute("value") == cards[TINY]["default_pn"] == "0.06M"
    assert sorted(aspects(driver)) == sorted(tiny) and len(tiny) == 15
    assert driver.find_element(By.CSS_SELECTOR, "input[name=aspect]:checked").get_attribute("value") == "1:1"
    pn.send_keys(Keys.ARROW_DOWN)  # 0.25M, by the keyboard
    driver.find_element(By.CSS_SELECTOR, "input[name=aspect][value='2:1']").find_element(By.XPATH, "..").click()
    width, height = map(int, tiny["2:1"]["0.25M"].split("x"))
    assert shown_size(driver) == f"2:1 at 0.25M: {width}×{height} pixels."  # noqa: RUF001 (the page's sign)
    assert f"{width}x{height}" in cards[TINY]["sizes"] and f"{width}x{height}" not in cards[DEFAULT]["sizes"]

    driver.execute_script(RECORD_REQUESTS)
    driver.find_element(By.ID, "prompt").send_keys("a red circle")
    status = generate_and_wait(driver)  # text-to-image
    # The server's side first: what it made (a size the default model cannot make), the model it names.
    assert_final_image(driver, status, width, height)
    assert TINY in driver.find_element(By.CSS_SELECTOR, "#history li").text  # from the `completed` event
    (body,) = sent_bodies(driver)
    assert (body["model"], body["pn"], body["aspect_ratio"]) == (TINY, "0.25M", "2:1")

    path = tmp_path / "wide.png"  # image-to-image goes to the chosen model too
    path.write_bytes(png_bytes(picture(96, 48)))
    driver.find_element(By.ID, "image-file").send_keys(str(path))
    wait(driver, lambda: driver.find_element(By.ID, "image-editor").is_displayed())
    status = generate_and_wait(driver)
    body = sent_bodies(driver)[-1]
    assert body["model"] == TINY and body["image"].startswith("data:image/png") and body["pn"] == "0.25M"
    assert f"1 image of {width}×{height}" in status, status  # noqa: RUF001
    history = driver.find_element(By.CSS_SELECTOR, "#history li").text
    assert TINY in history and "variation of an image" in history

    driver.refresh()  # the choice is kept on this device (the key, for the tab)
    wait(driver, lambda: options(driver, "model") == [DEFAULT, TINY])
    assert driver.find_element(By.ID, "model").get_attribute("value") == TINY
    assert options(driver, "pn") == ["0.06M", "0.25M"]

    pick(driver, DEFAULT)  # back to the one-size model: nothing left to choose but the prompt
    assert aspects(driver) == [] and not driver.find_element(By.ID, "pn").is_enabled()
    assert shown_size(driver) == "This model makes one size only: 64×64 pixels."  # noqa: RUF001
    driver.find_element(By.CSS_SELECTOR, "#history li button").click()  # Reuse: its model comes back
    assert driver.find_element(By.ID, "model").get_attribute("value") == TINY
    assert driver.find_element(By.ID, "pn").get_attribute("value") == "0.25M"
    assert console_errors(driver) == []
