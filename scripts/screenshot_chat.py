"""Screenshots of the chat page (`flamingo serve`'s `/`) in headless Chromium, driven as a person
would: a chat about an uploaded image, then a few-shot prompt (two named examples and a query),
generated and ranked. Needs Debian's `chromium` and `chromium-driver` and `pip install selenium`.

    python scripts/screenshot_chat.py --out screenshots      # -> chat.png, fewshot.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    args = parser.parse_args()

    import numpy as np
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flamingo.cli_options import load_model_quietly
    from flamingo.data.procedural import render, sample_scene
    from flamingo.serving.app import create_app
    from flamingo.serving.cli import model_name
    from flamingo.serving.engine import Engine
    from flamingo.serving.limits import ServerSettings
    from flamingo.serving.server import BackgroundServer

    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(3)
    for name, kind in [("query", "star"), ("dax", "star"), ("wug", "square"), ("chat", "heart")]:
        render(sample_scene(rng, kind=kind)).save(folder / f"{name}.png")

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,820"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    wait = WebDriverWait(driver, 300, poll_frequency=0.1)
    name = model_name(args.model)
    try:
        with BackgroundServer(create_app(Engine(load_model_quietly(args.model, trust_remote_code=False).eval()),
                                         ServerSettings(model_name=name))) as server:
            driver.get(server.url + "/")
            wait.until(lambda d: d.find_element(By.ID, "model-name").text == name)
            driver.find_element(By.ID, "image-input").send_keys(str(folder / "chat.png"))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
            driver.find_element(By.ID, "prompt").send_keys("What shape is this?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done=true]"))
            driver.save_screenshot(str(args.out / "chat.png"))

            driver.find_element(By.ID, "tab-fewshot").click()
            rows = driver.find_elements(By.CSS_SELECTOR, "#examples .example")
            for row, word in zip(rows, ["dax", "wug"]):
                row.find_element(By.CLASS_NAME, "example-image").send_keys(str(folder / f"{word}.png"))
                row.find_element(By.CLASS_NAME, "example-text").send_keys(f"This is a {word}.")
            driver.find_element(By.ID, "query-image").send_keys(str(folder / "query.png"))
            driver.find_element(By.ID, "query-text").send_keys("This is a")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".example img")) == 3)
            driver.find_element(By.ID, "candidates").send_keys("dax, wug")
            driver.find_element(By.ID, "fs-rank").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fs-output[data-done=true] table"))
            driver.save_screenshot(str(args.out / "fewshot.png"))
    finally:
        driver.quit()
    print(f"wrote {args.out / 'chat.png'} and {args.out / 'fewshot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
