"""The README's screenshot of the playground, from a real run of the shipped default model.

    python -m tests.server.playground_screenshot [--out docs/playground.png]

Serves weights/default on 127.0.0.1, drives the page in headless Chromium (a few generations so
that the history shows too, the last one with two images), and saves a screenshot of the page.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server.app import create_app
from server.main import build_engine
from server.settings import Settings
from tests.server.browser import chromium
from tests.server.conftest import running_server

# (prompt, seed, images): the default model draws flat-coloured shapes on a plain background.
RUNS = (("a yellow star", 4, 1), ("a blue square", 2, 1), ("a red circle", 11, 2))
MAX_BYTES = 300_000
log = logging.getLogger(__name__)


def generate(driver, prompt: str, seed: int, n: int) -> None:
    for element_id, value in (("prompt", prompt), ("n", str(n))):
        field = driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)
    if driver.find_element(By.ID, "random-seed").is_selected():
        driver.find_element(By.ID, "random-seed").click()
    seed_field = driver.find_element(By.ID, "seed")
    seed_field.clear()
    seed_field.send_keys(str(seed))
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))


def screenshot(out: Path) -> None:
    settings = Settings(warmup=False)
    engine, limits = build_engine(settings)
    with running_server(create_app(settings, engine, limits)) as url:
        driver = chromium(1200, 900)
        try:
            driver.get(f"{url}/")
            driver.execute_script("localStorage.clear(); sessionStorage.clear();")
            driver.refresh()
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model-line").text.startswith("Model"))
            for prompt, seed, n in RUNS:
                generate(driver, prompt, seed, n)
            # The whole page in one shot: the window's frame takes some height off the viewport.
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1200, height)
            frame = height - driver.execute_script("return window.innerHeight")
            driver.set_window_size(1200, height + frame)
            driver.execute_script("window.scrollTo(0, 0)")
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    engine.drain(5)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > MAX_BYTES:  # a flat UI loses nothing visible in 256 colours
        buffer = io.BytesIO()
        image.quantize(256).save(buffer, "PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    log.info("wrote %s (%dx%d, %d bytes)", out, image.width, image.height, buffer.tell())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    screenshot(parser.parse_args().out)


if __name__ == "__main__":
    main()
