"""The upload page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from api_support import TINY_LABELS, Server, photo, serving, tiny_repo_once

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
IN_CI = os.environ.get("ZOO_REQUIRE_BROWSER") == "1"  # .ci/run sets it: there the page test must run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    repo = tiny_repo_once(tmp_path_factory.getbasetemp())
    with serving(refs=(str(repo),)) as s:
        yield s


def browser() -> object:
    """Headless Chromium with the packaged driver given explicitly (selenium's own download fails offline)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if IN_CI:
            pytest.fail(f"chromium/chromedriver missing ({CHROMIUM}, {CHROMEDRIVER}); .ci/run installs them")
        pytest.skip("Debian chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)


def test_upload_shows_top_classes_and_uncertainty_split(server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "china.jpg"
    image.write_bytes(photo("china", size=128))
    driver = browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#model option")))
        assert driver.find_element(By.CSS_SELECTOR, "#model option").get_attribute("value") == "tiny-prior"
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        wait.until(ec.visibility_of_element_located((By.ID, "result")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#top .row")
        assert len(rows) == 5
        labels = [r.find_element(By.CSS_SELECTOR, ".label").text for r in rows]
        assert sorted(labels) == sorted(TINY_LABELS)
        split = driver.find_element(By.ID, "split").text
        assert "total" in split and "aleatoric" in split and "epistemic" in split
        assert driver.find_element(By.ID, "error").text == ""
        shot = tmp_path / "upload-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
        # an upload that is not an image shows the server's error message, not a result
        text = tmp_path / "notes.jpg"
        text.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(text))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "not a decodable image" in d.find_element(By.ID, "error").text)
    finally:
        driver.quit()
