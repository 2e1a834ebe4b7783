"""The web page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium at their system paths, no browser download) against a real server on loopback. Screenshots of
the page, the report and /docs go to $GRAPHPRUNE_TEST_ARTIFACTS (default test-artifacts/browser)."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_testing import DEMO, live_server

from service.settings import Settings

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("GRAPHPRUNE_TEST_ARTIFACTS", "test-artifacts")) / "browser"
WAIT_S = 120


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, name: str) -> None:
    """A full-page screenshot: the viewport is made as tall as the document first."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": min(max(height, 600), 8000), "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _status(driver: Any, job_id: str) -> str:
    rows = driver.find_elements(By.ID, f"job-{job_id}")
    return str(rows[0].get_attribute("data-status")) if rows else ""


def test_upload_watch_report_download_cancel(browser: Any, settings: Callable[..., Settings],
                                             tmp_path: Path) -> None:
    model = tmp_path / "demo.onnx"
    model.write_bytes(DEMO)
    with live_server(settings(max_concurrent_jobs=1)) as url:
        browser.get(url + "/")
        assert browser.find_element(By.ID, "submit").get_attribute("disabled") is not None  # nothing chosen yet
        browser.find_element(By.ID, "model").send_keys(str(model))
        assert "demo.onnx" in browser.find_element(By.ID, "drop-text").text
        sparsity = browser.find_element(By.CSS_SELECTOR, "[data-option=sparsity]")
        sparsity.clear()
        sparsity.send_keys("0.4")
        browser.find_element(By.ID, "submit").click()

        WebDriverWait(browser, 30).until(lambda d: "queued" in d.find_element(By.ID, "message").text)
        job_id = browser.find_element(By.ID, "message").text.split()[1]
        WebDriverWait(browser, WAIT_S).until(lambda d: _status(d, job_id) in ("succeeded", "failed"))
        row = browser.find_element(By.ID, f"job-{job_id}")
        assert _status(browser, job_id) == "succeeded", row.text
        assert "sparsity 0.4" in row.text and "→" in row.text  # options and input → result size
        _shot(browser, "page")

        download = row.find_element(By.CSS_SELECTOR, "[data-action=download]").get_attribute("href")
        pruned = httpx.get(download)
        assert pruned.status_code == 200 and 0 < len(pruned.content) < len(DEMO)

        row.find_element(By.CSS_SELECTOR, "[data-action=report]").click()  # opens a tab, as a person would
        WebDriverWait(browser, 10).until(lambda d: len(d.window_handles) == 2)
        browser.switch_to.window(browser.window_handles[1])
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.TAG_NAME, "svg"))
        plots = browser.find_elements(By.TAG_NAME, "svg")
        drawn = [p for p in plots if p.size["width"] > 100 and p.size["height"] > 50
                 and p.find_elements(By.CSS_SELECTOR, "rect, circle, path, polyline")]
        assert drawn, "the report shows no drawn plot"
        assert "params" in browser.find_element(By.TAG_NAME, "body").text
        _shot(browser, "report")
        browser.close()
        browser.switch_to.window(browser.window_handles[0])

        # a second model dropped onto the page (a DataTransfer, as the browser hands a dragged file over),
        # then cancelled or deleted from its row
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.onnx"));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        """, base64.b64encode(DEMO).decode())
        assert "dropped.onnx" in browser.find_element(By.ID, "drop-text").text
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 2)
        second = browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")[0]
        second_id = str(second.get_attribute("id")).removeprefix("job-")
        assert second_id != job_id
        second.find_element(By.CSS_SELECTOR, "button.small").click()
        WebDriverWait(browser, 30).until(
            lambda d: _status(d, second_id) == "cancelled" or not d.find_elements(By.ID, f"job-{second_id}"))
        assert httpx.get(f"{url}/v1/jobs/{second_id}").status_code in (200, 404)

        browser.get(url + "/docs")  # Swagger UI from the bundled assets renders the OpenAPI 3.1 spec
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
        assert "graphprune" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
        assert browser.find_elements(By.CSS_SELECTOR, ".opblock")  # the operations are listed
        _shot(browser, "docs")
