"""The playground page: its files and options over HTTP, then the page itself in headless Chromium
against a real server on 127.0.0.1 (tiny model), driven as a person would."""

from __future__ import annotations

import os
import re
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from model.schedules import TEMPLATES, ScaleSchedule, nearest_template
from server.app import create_app
from server.protocol import parse_aspect_ratio
from server.service import ModelLimits
from tests.server.browser import chromium, console_errors, missing_binaries
from tests.server.conftest import Gate, make_app, running_server
from tests.server.test_real_server import AUTH, hold_worker

KEY = AUTH["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def live(pipeline):
    """A real server that needs an API key and queues at most 2 images."""
    app, engine = make_app(pipeline, api_keys=[KEY], max_n=2, max_queue=2)
    gate = Gate()
    engine.fault_hook = gate
    with running_server(app) as url:
        yield url, engine, gate
    gate.opened.set()


@pytest.fixture(scope="module")
def browser():
    missing = missing_binaries()
    if missing:
        message = f"{missing} not installed: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    driver = chromium()
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 15):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def assert_final_image(driver, status: str, width: int, height: int) -> None:
    """The page says it made one image of this size, and shows one, loaded, of that size."""
    assert f"1 image of {width}×{height}" in status, status  # noqa: RUF001 (the page's sign)
    final = driver.find_element(By.CSS_SELECTOR, "#images img")
    wait(driver, lambda: driver.execute_script("return arguments[0].complete", final))
    size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", final)
    assert size == [width, height]


def open_page(driver, url: str, key: str | None = KEY):
    """A fresh page (no stored key or history), options loaded, key typed in when given."""
    driver.get(f"{url}/")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.refresh()
    wait(driver, lambda: driver.find_element(By.ID, "model-line").text.startswith("Model"))
    console_errors(driver)
    if key:
        driver.find_element(By.ID, "key-box").click()
        driver.find_element(By.ID, "api-key").send_keys(key)
    return driver


def set_value(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def error_text(driver) -> str:
    wait(driver, lambda: driver.find_element(By.ID, "error").is_displayed())
    return driver.find_element(By.ID, "error").text


def counter(url: str, sample: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


# ---- over HTTP ---------------------------------------------------------------------------------


def test_page_and_its_files_load_without_a_key_and_only_from_this_server(live):
    url = live[0]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from a CDN
    for name, kind in (("app.js", "text/javascript"), ("image.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(f"{url}/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "http://" not in asset.text and "https://" not in asset.text
    assert httpx.get(f"{url}/playground/index.html").status_code == 404
    assert httpx.get(f"{url}/playground/..%2Froutes_playground.py").status_code == 404
    assert httpx.post(f"{url}/generate", json={"prompt": "a"}).status_code == 401  # the API still needs it


def test_config_lists_every_template_and_the_allowed_pixel_budgets(live):
    url = live[0]
    config = httpx.get(f"{url}/playground/config").json()
    assert config["model"] == "infinity-test" and config["auth_required"] is True
    assert config["pixel_budgets"] == ["0.06M", "0.25M"] and config["default_pn"] == "0.06M"
    assert (config["max_n"], config["default_cfg"], config["default_tau"]) == (2, 3.0, 0.5)
    assert sorted(t["h_div_w"] for t in config["templates"]) == sorted(TEMPLATES)
    for t in config["templates"]:  # the label the page sends snaps back to its own template
        assert nearest_template(parse_aspect_ratio(t["aspect_ratio"])) == t["h_div_w"]
    by_label = {t["aspect_ratio"]: t for t in config["templates"]}
    assert by_label["1:1"]["sizes"]["0.06M"] == [64, 64] and by_label["2:1"]["sizes"]["0.25M"] == [184, 92]
    assert config["fixed_size"] is None


def test_config_of_a_model_with_one_schedule_gives_its_size(pipeline):
    app, engine = make_app(pipeline)
    try:
        limits = ModelLimits("one-size", "0.06M", "0.06M", ScaleSchedule.custom(((1, 1), (2, 2), (4, 4))))
        config = TestClient(create_app(app.state.settings, engine, limits)).get("/playground/config").json()
        assert config["fixed_size"] == [16, 16] and config["auth_required"] is False
    finally:
        engine.drain(5)


# ---- in the browser ------------------------------------------------------------------------------


def test_generate_shows_each_scale_then_the_final_image_and_keeps_history(live, browser):
    url = live[0]
    driver = open_page(browser, url)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys("a red circle")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard way to generate
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#images a[download]"))

    final = driver.find_element(By.CSS_SELECTOR, "#images img")
    wait(driver, lambda: driver.execute_script("return arguments[0].complete", final))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", final) == [64, 64]
    scales = driver.find_elements(By.CSS_SELECTOR, "#scales li")
    captions = [s.text for s in scales]
    assert len(scales) == 7, captions  # 6 previews and the final
    assert all(re.fullmatch(r"\d/7 · \d+\.\d\d s( · final)?", c) for c in captions), captions
    assert [c.split("/")[0] for c in captions] == [str(i) for i in range(1, 8)]
    widths = driver.execute_script("return [...document.querySelectorAll('#scales img')].map(i => i.naturalWidth)")
    assert widths == [64] * 7
    seed = re.fullmatch(r"Seed used: (\d+)", driver.find_element(By.ID, "seed-used").text)[1]
    status = driver.find_element(By.ID, "status").text
    assert status.startswith("Done in") and "1 image of 64×64, 7 scales" in status, status  # noqa: RUF001 (the multiplication sign the page prints)
    link = driver.find_element(By.CSS_SELECTOR, "#images a[download]")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == f"infinity-seed{seed}.png"

    driver.refresh()  # history is kept in this browser
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#history li"))
    entry = driver.find_element(By.CSS_SELECTOR, "#history li")
    assert "a red circle" in entry.text and f"seed {seed}" in entry.text and "64×64" in entry.text  # noqa: RUF001 (the multiplication sign the page prints)
    assert driver.execute_script("return arguments[0].querySelector('img').naturalWidth", entry) > 0
    entry.find_element(By.TAG_NAME, "button").click()
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == "a red circle"
    assert driver.find_element(By.ID, "seed").get_attribute("value") == seed
    assert not driver.find_element(By.ID, "random-seed").is_selected()
    assert console_errors(driver) == []


def test_invalid_request_and_missing_key_show_the_servers_error(live, browser):
    url = live[0]
    driver = open_page(browser, url)
    driver.find_element(By.ID, "prompt").send_keys("a star")
    set_value(driver, "tau", "0")
    driver.find_element(By.ID, "generate").click()
    text = error_text(driver)
    assert text.startswith("Invalid request (400)") and "tau" in text and "greater than or equal to 0.01" in text, text
    assert driver.find_element(By.ID, "tau").get_attribute("aria-invalid") == "true"
    assert driver.find_element(By.ID, "status").text == "Not generated."
    assert not driver.find_elements(By.CSS_SELECTOR, "#images .tile")

    set_value(driver, "tau", "1")
    driver.find_element(By.ID, "api-key").clear()
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda: "(401)" in driver.find_element(By.ID, "error").text)
    text = driver.find_element(By.ID, "error").text
    assert text.startswith("API key needed (401)") and "missing API key" in text, text
    assert driver.switch_to.active_element.get_attribute("id") == "api-key"  # focus goes where the fix is
    assert console_errors(driver) == []


def test_busy_server_shows_the_retry_time(pipeline, browser):
    """A server of its own: the Retry-After comes from the batch times its engine has seen (none yet:
    the floor, 1 s), not from how long the batches of the tests before it took."""
    app, engine = make_app(pipeline, api_keys=[KEY], max_n=2, max_queue=2)
    gate = Gate()
    engine.fault_hook = gate
    with running_server(app) as url:
        driver = open_page(browser, url)
        held = hold_worker(url, gate)
        queued = threading.Thread(
            target=lambda: httpx.post(f"{url}/generate", json={"prompt": "two", "n": 2}, headers=AUTH, timeout=30)
        )
        queued.start()
        try:
            wait(driver, lambda: engine.batcher.depth == 2)  # the queue is full
            driver.find_element(By.ID, "prompt").send_keys("one more")
            driver.find_element(By.ID, "generate").click()
            text = error_text(driver)
            assert text.startswith("Server busy (429)") and "queue is full" in text and "Retry in 1 s." in text, text
        finally:
            gate.opened.set()
            held.join(30)
            queued.join(30)
    engine.drain(5)


def test_cancel_removes_the_queued_request_on_the_server(live, browser):
    url, engine, gate = live
    driver = open_page(browser, url)
    held = hold_worker(url, gate)
    ahead = threading.Thread(
        target=lambda: httpx.post(f"{url}/generate", json={"prompt": "first"}, headers=AUTH, timeout=30)
    )
    ahead.start()
    try:
        wait(driver, lambda: engine.batcher.depth == 1)
        before = counter(url, 'infinity_cancelled_requests_total{model="infinity-test",stage="queued"}')
        driver.find_element(By.ID, "prompt").send_keys("never mind")
        driver.find_element(By.ID, "generate").click()
        status = driver.find_element(By.ID, "status")
        wait(driver, lambda: status.text.startswith("Queued: 1 image ahead of yours · waiting"))
        assert engine.batcher.depth == 2
        driver.find_element(By.ID, "cancel").click()
        wait(driver, lambda: status.text.startswith("Cancelled"))
        deadline = time.monotonic() + 5
        while counter(url, 'infinity_cancelled_requests_total{model="infinity-test",stage="queued"}') < before + 1:
            assert time.monotonic() < deadline, "the server never counted the cancellation"
            time.sleep(0.05)
        assert engine.batcher.depth == 1  # the other request still waits
        assert driver.find_element(By.ID, "generate").is_enabled()
        assert not driver.find_elements(By.CSS_SELECTOR, "#images .tile")  # no placeholder left behind
        assert console_errors(driver) == []
    finally:
        gate.opened.set()
        held.join(30)
        ahead.join(30)


def test_phone_sized_screen_labels_and_keyboard(live, browser):
    url = live[0]
    browser.set_window_size(390, 844)
    try:
        driver = open_page(browser, url)
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        unlabelled = driver.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)"
        )
        assert unlabelled == []
        radios = driver.find_elements(By.CSS_SELECTOR, "input[name=aspect]")
        assert len(radios) == 15
        checked = driver.find_element(By.CSS_SELECTOR, "input[name=aspect]:checked")
        assert checked.get_attribute("value") == "1:1"
        checked.send_keys(Keys.ARROW_RIGHT)  # the shapes are real radio buttons
        assert driver.find_element(By.CSS_SELECTOR, "input[name=aspect]:checked").get_attribute("value") != "1:1"
        assert "pixels" in driver.find_element(By.ID, "size-hint").text
    finally:
        browser.set_window_size(1280, 1000)
