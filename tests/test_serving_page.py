"""The chat page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by .ci/run) loads `/` from a live server over a tiny model, uploads an image, asks a
question and shows the streamed answer; the few-shot mode generates and ranks; large photos are
scaled down before they are sent, and refusals and empty answers are told in a person's words."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from conftest import solid_image
from PIL import Image

from flamingo.inference import generate_text, text_prompt
from flamingo.inference.chat import DIALOGUE_PROMPT, DIALOGUE_STOP_STRINGS
from flamingo.inference.scoring import score_candidates
from flamingo.inference.state import encode_prompts
from flamingo.serving.app import create_app
from flamingo.serving.engine import Delta, Engine
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


class RecordingEngine(Engine):
    """The real engine, keeping the images each request sent; `empty` makes every answer empty
    (the model ends at once)."""

    def __init__(self, model, empty: bool = False) -> None:
        super().__init__(model)
        self.images: list[bytes] = []
        self.empty = empty

    def generate(self, request, prompt=None):
        self.images += request.images
        if not self.empty:
            return super().generate(request, prompt)

        async def nothing():
            yield Delta(0, "", "stop", prompt_tokens=1, completion_tokens=1)
        return nothing()


def _noise(width: int, height: int):
    return Image.frombytes("RGB", (width, height), np.random.default_rng(0).bytes(width * height * 3))


def _send(browser, path, question: str = "What is it?"):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "image-input").send_keys(str(path))
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img") or d.find_element(
        By.ID, "status").text, "the attachment or a message")
    if not browser.find_elements(By.CSS_SELECTOR, "#attachments img"):
        return None
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()
    return _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message[data-done=true]"), "the answer")[-1]


def test_page_scales_a_large_photo_down_and_keeps_the_original_for_display(browser, model, tmp_path):
    """A 9 MB photo (2000x1500): the server gets it at most 1024 px on its longer side, within its
    byte limit; the conversation shows the original."""
    from selenium.webdriver.common.by import By

    _noise(2000, 1500).save(tmp_path / "photo.png")
    assert (tmp_path / "photo.png").stat().st_size > ServerSettings().max_image_bytes
    engine = RecordingEngine(model)
    with BackgroundServer(create_app(engine, ServerSettings(model_name="tiny"))) as server:
        browser.get(server.url + "/")
        _wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "tiny", "the model name")
        browser.execute_script("arguments[0].value = '2'", browser.find_element(By.ID, "max-tokens"))
        reply = _send(browser, tmp_path / "photo.png")
        assert "error" not in reply.get_attribute("class"), reply.text
        sent = Image.open(io.BytesIO(engine.images[-1]))
        assert max(sent.size) <= 1024 and sent.size[0] * 3 == sent.size[1] * 4
        assert len(engine.images[-1]) <= ServerSettings().max_image_bytes
        shown = browser.find_element(By.CSS_SELECTOR, ".message.user .thumbs img")
        assert browser.execute_script("return arguments[0].naturalWidth", shown) == 2000


def test_page_speaks_of_too_large_images_and_empty_answers_to_a_person(browser, model, tmp_path):
    from selenium.webdriver.common.by import By

    _noise(600, 600).save(tmp_path / "noise.png")  # 1.0 MB; about 100 KB as a JPEG even at 512 px
    solid_image("red", 200).save(tmp_path / "red.png")
    settings = ServerSettings(model_name="tiny", max_image_bytes=20_000, max_image_pixels=10_000)
    engine = RecordingEngine(model, empty=True)
    with BackgroundServer(create_app(engine, settings)) as server:
        browser.get(server.url + "/")
        _wait(browser, lambda d: d.find_element(By.ID, "model-name").text == "tiny", "the model name")
        # too many bytes even scaled down: the page says so and sends nothing
        assert _send(browser, tmp_path / "noise.png") is None
        assert browser.find_element(By.ID, "status").text == (
            "This image is 1.0 MB; the server takes up to 20 KB, and it is still larger scaled down.")
        assert not engine.images
        # too many pixels (the server's check): its refusal in a person's words, not the API's
        reply = _send(browser, tmp_path / "red.png")
        assert "error" in reply.get_attribute("class")
        text = reply.find_element(By.CLASS_NAME, "text").text
        assert text.startswith("This image is too large for the server") and "image_url" not in text
        # an empty answer is marked as one
        browser.find_element(By.ID, "reset").click()
        browser.find_element(By.ID, "prompt").send_keys("Say nothing.")
        browser.find_element(By.ID, "send").click()
        reply = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done=true]"),
                      "the empty answer")[-1]
        assert "empty" in reply.get_attribute("class")
        assert reply.find_element(By.CLASS_NAME, "text").text == "(empty answer: the model said nothing)"
