"""The built-in chat page in a real headless Chromium (the distribution's ``chromium`` and ``chromium-driver``,
driven by Selenium; skipped when either is missing): the API-key prompt, the model's name, a streamed reply that
grows on screen, tokens/s, Stop aborting the request on the server, a sane layout (and its screenshot), and
``--no-ui``. The server runs the tiny random-weight model on the reference attention, each engine step slowed a
little so that a reply streams visibly."""
import os
import shutil
import struct
import time

import httpx
import pytest

from flashserve.models.checkpoint import write_random_checkpoint
from flashserve.server.options import ServerOptions
from test_server import MODEL_NAME, reference_server

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no Chromium and chromedriver installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

API_KEY = "page-secret"
STEP_DELAY_S = 0.03
WIDTH, HEIGHT = 1200, 800


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_random_checkpoint(str(tmp_path_factory.mktemp("page-llama")), "LlamaForCausalLM", seed=14)
    with reference_server(model_dir, ServerOptions(api_key=API_KEY), max_model_len=512,
                          num_kv_blocks=512) as (url, driver):
        engine = driver.engine
        step, abort = engine.step, engine.abort_request
        engine.aborted = []

        def slow_step():
            time.sleep(STEP_DELAY_S)
            return step()

        def recorded_abort(request_id):
            engine.aborted.append(request_id)
            return abort(request_id)

        engine.step, engine.abort_request = slow_step, recorded_abort
        yield url, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def _wait(browser, condition, timeout_s=30.0, message=""):
    return WebDriverWait(browser, timeout_s, poll_frequency=0.02).until(lambda _: condition(), message)


def _replies(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#messages li.assistant")


def _set(browser, element_id, value):
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_chat_streams_stops_and_lays_out(server, browser, tmp_path):
    url, driver = server
    browser.get(url + "/")
    _wait(browser, lambda: browser.find_element(By.ID, "key-dialog").get_attribute("open") is not None,
          message="the page should ask for the API key")
    browser.find_element(By.ID, "key").send_keys(API_KEY)
    browser.find_element(By.ID, "key-save").click()
    _wait(browser, lambda: browser.find_element(By.ID, "model").text == MODEL_NAME)

    _set(browser, "max_tokens", "40")
    _set(browser, "seed", "1")
    browser.find_element(By.ID, "prompt").send_keys("Tell me a story")
    browser.find_element(By.ID, "send").click()
    lengths = set()
    _wait(browser, lambda: lengths.add(len(_replies(browser)[0].text)) or
          browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    assert len(lengths - {0}) >= 2, f"the reply should appear piece by piece, saw lengths {sorted(lengths)}"
    assert "tok/s" in browser.find_element(By.ID, "speed").text and "tokens in" in browser.find_element(
        By.ID, "speed").text
    assert "error" not in _replies(browser)[0].get_attribute("class")

    _set(browser, "max_tokens", "400")
    _set(browser, "temperature", "0")
    browser.find_element(By.ID, "prompt").send_keys("Another, longer one")
    browser.find_element(By.ID, "send").click()
    _wait(browser, lambda: len(_replies(browser)) == 2 and len(_replies(browser)[1].text) > 5)
    aborted_before = len(driver.engine.aborted)
    browser.find_element(By.ID, "stop").click()
    _wait(browser, lambda: "stopped" in _replies(browser)[1].get_attribute("class"))
    _wait(browser, lambda: len(driver.engine.aborted) > aborted_before, 10,
          "stopping should abort the request on the server")
    _wait(browser, lambda: not driver.submit(lambda engine: engine.has_unfinished()).result(), 10)
    assert len(_replies(browser)[1].text) < 400

    layout = browser.execute_script("""
        const box = (id) => document.getElementById(id).getBoundingClientRect();
        return {scrollWidth: document.documentElement.scrollWidth, innerWidth: innerWidth, innerHeight: innerHeight,
                composer: box("composer"), messages: box("messages"), settings: box("settings"),
                header: box("model")};""")
    assert layout["scrollWidth"] <= layout["innerWidth"], "no horizontal overflow"
    assert layout["composer"]["bottom"] <= layout["innerHeight"] + 1 and layout["composer"]["top"] >= \
        layout["messages"]["bottom"] - 1, "the composer sits under the messages, inside the window"
    assert layout["settings"]["left"] >= layout["messages"]["right"] - 1 and layout["settings"]["width"] > 150
    assert layout["header"]["top"] < layout["messages"]["top"]
    screenshot = tmp_path / "chat.png"
    assert browser.save_screenshot(str(screenshot))
    png = screenshot.read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (layout["innerWidth"], layout["innerHeight"])
    assert len(png) > 10_000, "the screenshot should not be blank"
    if os.environ.get("FLASHSERVE_SCREENSHOT_DIR"):
        shutil.copy(screenshot, os.environ["FLASHSERVE_SCREENSHOT_DIR"])


def test_no_ui(tmp_path_factory):
    model_dir = write_random_checkpoint(str(tmp_path_factory.mktemp("no-ui-llama")), "LlamaForCausalLM", seed=15)
    with reference_server(model_dir, ServerOptions(ui=False)) as (url, _):
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/ui/chat.js").status_code == 404
