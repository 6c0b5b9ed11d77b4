"""The playground in a real headless browser: Debian chromium + chromedriver (scripts/setup.sh), via selenium."""

from __future__ import annotations

import shutil

import pytest
import requests

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium / chromium-driver are not installed: run scripts/setup.sh")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,900",
        "--disable-extensions",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # explicit driver: no download
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_generates_in_a_real_browser(serve_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    d.get(serve_app + "/")
    wait = WebDriverWait(d, 60)
    wait.until(lambda drv: drv.execute_script("return document.body.dataset.ready === '1'"))
    picker = Select(d.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == ["tiny", "tiny-edit"]
    assert picker.first_selected_option.get_attribute("value") == "tiny"
    assert d.find_element(By.ID, "nfe").get_attribute("max") == "8"

    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a photo of a dress")
    d.execute_script(
        "const s = document.getElementById('nfe'); s.value = 2;s.dispatchEvent(new Event('input'));"
    )
    assert d.find_element(By.ID, "nfe-value").text == "2"
    for field, value in (("seed", "7"), ("num-images", "2")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.ID, "generate").click()
    wait.until(
        lambda drv: (
            len(drv.find_elements(By.CSS_SELECTOR, "#images img")) == 2
            and "ms round trip" in drv.find_element(By.ID, "latency").text
        )
    )
    imgs = d.find_elements(By.CSS_SELECTOR, "#images img")
    assert all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 28 for i in imgs
    )
    latency = d.find_element(By.ID, "latency").text
    assert "2 NFE" in latency and "seed 7" in latency and d.find_element(By.ID, "error").text == ""
    # the browser shows exactly what the API returns for the same request
    api = requests.post(
        serve_app + "/v1/generate",
        json={"prompt": "a photo of a dress", "nfe": 2, "seed": 7, "num_images": 2, "model": "tiny"},
        timeout=60,
    ).json()
    assert [i.get_attribute("src").split(",", 1)[1] for i in imgs] == [im["data"] for im in api["images"]]

    # a request the server rejects shows its JSON error in the page, and the page keeps working
    prompt.clear()
    prompt.send_keys("x" * 101)
    d.find_element(By.ID, "generate").click()
    wait.until(lambda drv: "422" in drv.find_element(By.ID, "error").text)
    assert "prompt" in d.find_element(By.ID, "error").text
