"""The chat page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by .ci/run) loads `/` from a live server over a tiny model, uploads an image, asks a
question and shows the streamed answer; the few-shot mode generates and ranks."""

from __future__ import annotations

import shutil

import pytest
from conftest import solid_image

from flamingo.inference import generate_text, text_prompt
from flamingo.inference.chat import DIALOGUE_PROMPT, DIALOGUE_STOP_STRINGS
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.serving.app import create_app
from flamingo.serving.engine import Engine
from flamingo.serving.limits import ServerSettings
from flamingo.serving.server import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 120, poll_frequency=0.05).until(condition, message=f"waiting for {what}")


def test_page_sends_an_image_and_a_question_and_shows_the_streamed_answer(browser, model, tmp_path):
    from selenium.webdriver.common.by import By

    red, blue, green = (solid_image(c) for c in ("red", "blue", "green"))
    for name, image in (("red", red), ("blue", blue), ("green", green)):
        image.save(tmp_path / f"{name}.png")
    question = "What colour is this?"
    expected = generate_text(model, text_prompt(f"{DIALOGUE_PROMPT}User: <image>{question}\nFlamingo:", [red]),
                             max_new_tokens=6, stop_strings=DIALOGUE_STOP_STRINGS)
    assert expected.strip()
    with BackgroundServer(create_app(Engine(model), ServerSettings(model_name="tiny"))) as server:
        browser.get(server.url + "/")
        _wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "tiny", "the model name")
        max_tokens = browser.find_element(By.ID, "max-tokens")
        browser.execute_script("arguments[0].value = '6'", max_tokens)
        browser.find_element(By.ID, "image-input").send_keys(str(tmp_path / "red.png"))
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"), "the attachment preview")
        browser.find_element(By.ID, "prompt").send_keys(question)
        browser.find_element(By.ID, "send").click()
        reply = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done=true]"),
                      "the answer")[0]
        assert reply.find_element(By.CLASS_NAME, "text").get_attribute("textContent") == expected.lstrip()
        assert browser.find_elements(By.CSS_SELECTOR, ".message.user .thumbs img")
        assert browser.find_element(By.ID, "status").text == ""

        # few-shot: two examples, then a query; generation continues the query's text
        browser.find_element(By.ID, "tab-fewshot").click()
        rows = browser.find_elements(By.CSS_SELECTOR, "#examples .example")
        for row, (name, text) in zip(rows, [("red", "This is a dax."), ("blue", "This is a wug.")]):
            row.find_element(By.CLASS_NAME, "example-image").send_keys(str(tmp_path / f"{name}.png"))
            row.find_element(By.CLASS_NAME, "example-text").send_keys(text)
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#examples img")) == 2, "example previews")
        browser.find_element(By.ID, "query-image").send_keys(str(tmp_path / "green.png"))
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#query-thumb img"), "the query preview")
        browser.find_element(By.ID, "query-text").send_keys("This is a")
        browser.find_element(By.ID, "fs-generate").click()
        output = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fs-output[data-done=true]"),
                       "the few-shot answer")[0]
        prompt = "<image>This is a dax.<|endofchunk|><image>This is a wug.<|endofchunk|><image>This is a"
        assert browser.find_element(By.ID, "fs-prompt").get_attribute("textContent") == prompt
        continuation = generate_text(model, text_prompt(prompt, [red, blue, green]), max_new_tokens=6)
        assert output.get_attribute("textContent") == "This is a" + continuation

        browser.execute_script("document.getElementById('fs-output').removeAttribute('data-done')")
        browser.find_element(By.ID, "candidates").send_keys("dax, wug")
        browser.find_element(By.ID, "fs-rank").click()
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fs-output[data-done=true] table"), "the ranking")
        shown = [row.find_elements(By.TAG_NAME, "td")[0].text
                 for row in browser.find_elements(By.CSS_SELECTOR, "#fs-output tr")]
        state = encode_prompts(model, [text_prompt(prompt, [red, blue, green])])
        scores = score_candidates(model, state, [" dax", " wug"]).sum_logprob[0].tolist()
        assert shown == (["dax", "wug"] if scores[0] >= scores[1] else ["wug", "dax"])
        assert browser.find_element(By.ID, "status").text == ""
