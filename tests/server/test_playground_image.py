"""Image-to-image in the playground, in headless Chromium against a real server (tiny model): choose
or drop an image, paint a mask, set the strength, and check both the request the page sends (the
mask decoded with PIL) and the image the server sends back."""

from __future__ import annotations

import base64
import io
import itertools
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.server import test_playground as playground
from tests.server.browser import console_errors
from tests.server.test_playground import assert_final_image, open_page, wait

# The page's own fixtures: a real server with an API key on 127.0.0.1, and headless Chromium.
live, browser = playground.live, playground.browser

# Records the JSON bodies the page posts to /generate, then lets them through to the server.
RECORD_REQUESTS = """
window.sentBodies = [];
const send = window.fetch;
window.fetch = (url, init) => {
  if (url === "/generate") window.sentBodies.push(init.body);
  return send(url, init);
};
"""
# A synthetic drop of one PNG file on the image field, as the browser fires it for a real drag.
DROP_FILE = """
const [b64, name, target] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
for (const type of ["dragenter", "dragover", "drop"]) {
  document.getElementById(target).dispatchEvent(
    new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer }));
}
"""


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: opaque blocks of colour, so a re-encoded copy must match it exactly."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def from_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url.removeprefix(prefix))))


def sent_bodies(driver) -> list[dict]:
    return [json.loads(body) for body in driver.execute_script("return window.sentBodies")]


def generate_and_wait(driver) -> str:
    driver.find_element(By.ID, "generate").click()
    status, error = driver.find_element(By.ID, "status"), driver.find_element(By.ID, "error")
    wait(driver, lambda: status.text.startswith("Done") or error.is_displayed(), timeout=60)
    assert status.text.startswith("Done"), (status.text, error.text)
    return status.text


def template_size(url: str, aspect: str, pn: str = "0.06M") -> list[int]:
    config = httpx.get(f"{url}/playground/config").json()
    return next(t["sizes"][pn] for t in config["templates"] if t["aspect_ratio"] == aspect)


def drag(driver, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press at `start`, move to `end` in a few steps, release; fractions of the canvas, (0, 0) top left."""
    box = canvas.rect
    points = [(start[0] + (end[0] - start[0]) * k / 4, start[1] + (end[1] - start[1]) * k / 4) for k in range(5)]
    offsets = [(round((x - 0.5) * box["width"]), round((y - 0.5) * box["height"])) for x, y in points]
    actions = ActionChains(driver).move_to_element_with_offset(canvas, *offsets[0]).click_and_hold()
    for (x0, y0), (x1, y1) in itertools.pairwise(offsets):
        actions.move_by_offset(x1 - x0, y1 - y0)
    actions.release().perform()


def test_paint_a_mask_and_send_an_edit(live, browser, tmp_path):
    url = live[0]
    source = picture(96, 64)
    path = tmp_path / "room.png"
    path.write_bytes(png_bytes(source))
    driver = open_page(browser, url)
    assert not driver.find_element(By.ID, "image-editor").is_displayed()

    driver.find_element(By.ID, "image-file").send_keys(str(path))
    preview = driver.find_element(By.ID, "image-preview")
    wait(driver, lambda: preview.is_displayed() and driver.execute_script("return arguments[0].complete", preview))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", preview) == [96, 64]
    assert "room.png: 96×64 pixels" in driver.find_element(By.ID, "image-info").text  # noqa: RUF001 (the page's sign)
    aspect = driver.find_element(By.CSS_SELECTOR, "input[name=aspect]:checked").get_attribute("value")
    assert aspect == "3:2"  # the template nearest the input's shape
    assert driver.find_element(By.ID, "strength-value").text == "0.60"  # a variation's default
    assert driver.find_element(By.ID, "mask-state").text.startswith("Variation")

    canvas = driver.find_element(By.ID, "mask-canvas")
    drag(driver, canvas, (0.2, 0.25), (0.8, 0.25))  # a brush stroke across the top
    assert driver.find_element(By.ID, "mask-state").text.startswith("Edit")
    assert driver.find_element(By.ID, "strength-value").text == "1.00"  # an edit's default
    driver.find_element(By.CSS_SELECTOR, "input[name=mask-tool][value=rectangle]").click()
    drag(driver, canvas, (0.6, 0.6), (0.9, 0.9))  # a rectangle, bottom right
    strength = driver.find_element(By.ID, "strength")
    strength.send_keys(Keys.ARROW_LEFT * 4)  # 1 -> 0.8 by the keyboard
    assert driver.find_element(By.ID, "strength-value").text == "0.80"

    driver.execute_script(RECORD_REQUESTS)
    driver.find_element(By.ID, "prompt").send_keys("a red armchair")
    status = generate_and_wait(driver)
    (body,) = sent_bodies(driver)
    assert (body["prompt"], body["strength"], body["paste"], body["aspect_ratio"]) == (
        "a red armchair",
        0.8,
        True,
        "3:2",
    )
    image = from_data_url(body["image"])
    assert np.array_equal(np.asarray(image.convert("RGB")), source)  # the pixels shown are the pixels sent

    mask = from_data_url(body["mask"])
    assert (mask.format, mask.mode, mask.size) == ("PNG", "RGBA", (96, 64))
    alpha = np.asarray(mask.getchannel("A"))
    assert set(np.unique(alpha)) == {0, 255}  # painted or not, no antialiased edge
    assert (alpha[16, 20:77] == 0).all()  # along the stroke: y = 0.25 * 64, x from 0.2 * 96 to 0.8 * 96
    assert (alpha[39:57, 58:86] == 0).all()  # inside the rectangle
    assert (alpha[:, :14] == 255).all() and (alpha[26:36, :50] == 255).all() and (alpha[:8] == 255).all()

    width, height = template_size(url, "3:2")
    assert_final_image(driver, status, width, height)
    assert "edit of an image, strength 0.8" in driver.find_element(By.CSS_SELECTOR, "#history li").text
    assert console_errors(driver) == []


def test_drop_an_image_vary_it_without_a_prompt_then_remove_it(live, browser):
    url = live[0]
    driver = open_page(browser, url)
    driver.execute_script(
        DROP_FILE, base64.b64encode(png_bytes(picture(40, 80, seed=1))).decode(), "tall.png", "image-field"
    )
    preview = driver.find_element(By.ID, "image-preview")
    wait(driver, lambda: preview.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", preview))
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", preview) == [40, 80]
    assert driver.find_element(By.CSS_SELECTOR, "input[name=aspect]:checked").get_attribute("value") == "1:2"

    canvas = driver.find_element(By.ID, "mask-canvas")  # painted, then cleared: a variation again
    drag(driver, canvas, (0.3, 0.3), (0.7, 0.7))
    assert driver.find_element(By.ID, "strength-value").text == "1.00"
    driver.find_element(By.ID, "clear-mask").click()
    assert driver.find_element(By.ID, "mask-state").text.startswith("Variation")
    assert driver.find_element(By.ID, "strength-value").text == "0.60"
    assert not driver.find_element(By.ID, "paste").is_enabled()

    driver.execute_script(RECORD_REQUESTS)
    status = generate_and_wait(driver)  # no prompt: allowed with an image
    width, height = template_size(url, "1:2")
    assert f"1 image of {width}×{height}" in status, status  # noqa: RUF001 (the page's sign)
    (body,) = sent_bodies(driver)
    assert body["prompt"] == "" and body["strength"] == 0.6 and "mask" not in body and "paste" not in body
    assert from_data_url(body["image"]).size == (40, 80)
    assert "variation of an image" in driver.find_element(By.CSS_SELECTOR, "#history li").text

    driver.find_element(By.ID, "remove-image").click()  # back to text-to-image
    assert not driver.find_element(By.ID, "image-editor").is_displayed()
    assert driver.switch_to.active_element.get_attribute("id") == "image-file"
    driver.find_element(By.ID, "generate").click()
    assert "Type a prompt first" in driver.find_element(By.ID, "error").text  # a prompt is needed again
    driver.find_element(By.ID, "prompt").send_keys("a blue square")
    generate_and_wait(driver)
    body = sent_bodies(driver)[-1]
    assert not {"image", "mask", "strength", "paste"} & body.keys(), body  # what an older server accepts
    assert console_errors(driver) == []


def test_mask_by_keyboard_on_a_phone_sized_screen(live, browser, tmp_path):
    path = tmp_path / "square.png"
    path.write_bytes(png_bytes(picture(64, 64, seed=2)))
    browser.set_window_size(390, 844)
    try:
        driver = open_page(browser, live[0])
        driver.find_element(By.ID, "image-file").send_keys(str(path))
        canvas = driver.find_element(By.ID, "mask-canvas")
        wait(driver, lambda: canvas.is_displayed())
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        radius = 12 * 64 / canvas.rect["width"]  # the 24 px brush, in image pixels; a key step is half a brush
        canvas.send_keys(Keys.SPACE)  # a dot in the middle
        assert driver.find_element(By.ID, "mask-state").text.startswith("Edit")
        canvas.send_keys(Keys.SHIFT, Keys.ARROW_RIGHT * 3)  # painted on the way right
        alpha = np.asarray(from_data_url(driver.execute_script("return imageFields().mask")).getchannel("A"))
        assert (alpha[32, 32 : round(32 + 3 * radius)] == 0).all() and alpha[0, 0] == 255
        canvas.send_keys(Keys.ARROW_LEFT * 3)  # back to the middle, not painting
        driver.find_element(By.ID, "erase").click()
        canvas.send_keys(Keys.SPACE)  # the first dot erased, the line's end kept
        alpha = np.asarray(from_data_url(driver.execute_script("return imageFields().mask")).getchannel("A"))
        assert alpha[32, 32] == 255 and alpha[32, round(32 + 2.5 * radius)] == 0
        unlabelled = driver.execute_script(
            "return [...document.querySelectorAll('#image-field input')]"
            ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.outerHTML)"
        )
        assert unlabelled == []
        assert console_errors(driver) == []
    finally:
        browser.set_window_size(1280, 1000)


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_a_file_that_is_not_an_image_is_refused_in_the_page(live, browser, tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    driver = open_page(browser, live[0])
    driver.find_element(By.ID, "image-file").send_keys(str(path))
    wait(driver, lambda: driver.find_element(By.ID, "error").is_displayed())
    assert driver.find_element(By.ID, "error").text.startswith("Not an image")
    assert driver.find_element(By.ID, "image-file").get_attribute("aria-invalid") == "true"
    assert not driver.find_element(By.ID, "image-editor").is_displayed()
