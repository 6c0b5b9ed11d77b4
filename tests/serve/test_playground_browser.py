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


def test_playground_edit_mode_in_a_real_browser(serve_app, browser, tmp_path):
    """Edit mode: an example drawn by the page, then an uploaded file; the result sits beside the
    input and equals what /v1/edit returns for the same image; a rejected upload shows its error."""
    import base64
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    d.get(serve_app + "/")
    wait = WebDriverWait(d, 60)
    wait.until(lambda drv: drv.execute_script("return document.body.dataset.ready === '1'"))
    assert not d.find_element(By.ID, "instruction").is_displayed()
    d.find_element(By.ID, "mode-edit").click()
    assert Select(d.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "tiny-edit"
    assert (
        d.find_element(By.ID, "instruction").is_displayed()
        and not d.find_element(By.ID, "prompt").is_displayed()
    )
    Select(d.find_element(By.ID, "edit-example")).select_by_index(1)  # "digit 7", drawn at 28x28
    for field, value in (("seed", "5"), ("num-images", "1"), ("instruction", "flip the digit horizontally")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)

    def edit_and_compare() -> None:
        d.execute_script("document.getElementById('images').innerHTML = ''")  # no stale result to match
        d.find_element(By.ID, "generate").click()
        wait.until(
            lambda drv: (
                len(drv.find_elements(By.CSS_SELECTOR, "#result-slot #images img")) == 1
                and "ms round trip" in drv.find_element(By.ID, "latency").text
            )
        )
        out = d.find_element(By.CSS_SELECTOR, "#result-slot #images img")
        wait.until(
            lambda drv: drv.execute_script("return arguments[0].complete && arguments[0].naturalWidth", out)
        )
        src = d.find_element(By.ID, "edit-input").get_attribute("src")
        api = requests.post(
            serve_app + "/v1/edit",
            json={
                "model": "tiny-edit",
                "image": src,
                "instruction": "flip the digit horizontally",
                "seed": 5,
            },
            timeout=60,
        ).json()
        assert out.get_attribute("src").split(",", 1)[1] == api["images"][0]["data"]
        assert d.find_element(By.ID, "error").text == "" and "seed 5" in d.find_element(By.ID, "latency").text

    edit_and_compare()
    example = d.find_element(By.ID, "edit-input").get_attribute("src")
    assert example.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(example.split(",", 1)[1]))).size == (28, 28)

    upload = tmp_path / "upload.png"
    Image.new("L", (40, 40), 30).save(upload)
    d.find_element(By.ID, "edit-file").send_keys(str(upload))
    wait.until(lambda drv: drv.find_element(By.ID, "edit-input").get_attribute("src") != example)
    edit_and_compare()

    gif = tmp_path / "upload.gif"
    Image.new("L", (20, 20), 30).save(gif)
    d.find_element(By.ID, "edit-file").send_keys(str(gif))
    wait.until(lambda drv: "image/gif" in drv.find_element(By.ID, "edit-input").get_attribute("src"))
    d.find_element(By.ID, "generate").click()
    wait.until(lambda drv: "400 bad_image" in drv.find_element(By.ID, "error").text)
    d.find_element(By.ID, "mode-generate").click()  # back to generating: the prompt is there again
    assert (
        d.find_element(By.ID, "prompt").is_displayed()
        and d.find_element(By.ID, "generate").text == "Generate"
    )
