"""The web gallery in a real browser: headless Chromium (Debian's chromium + chromium-driver) drives
the page served by a live uvicorn server on loopback, picks a product, sets a filter, checks results.
A screenshot is kept under .visrec/test-artefacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tests.helpers import MakeCatalogue, live_server, run_sync
from visrec.api import create_app
from visrec.config import Settings

if TYPE_CHECKING:  # selenium is imported where a browser is driven (the tests skip without one)
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTEFACTS = Path(__file__).parents[1] / ".visrec" / "test-artefacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them when run as root)",
)


@pytest.fixture
def server(make_catalogue: MakeCatalogue, settings: Settings) -> Iterator[str]:
    run_sync(make_catalogue(27), settings)
    with live_server(create_app(settings, torch.device("cpu"))) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    yield driver
    driver.quit()


def natural_width(img: WebElement) -> float:
    """The loaded width of an <img> (0 until its photo has loaded): a JavaScript number, which
    selenium's annotation of `get_property` (str | bool | WebElement | dict) leaves out."""
    width = img.get_property("naturalWidth")
    assert isinstance(width, (int, float)), width
    return width


def test_pick_a_product_filter_and_see_neighbours(server: str, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(server + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalogue figure")) == 24)

    browser.find_elements(By.CSS_SELECTOR, "#catalogue figure")[0].click()  # pick a product
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#neighbours figure.hit")))
    picked = browser.find_element(By.NAME, "product").get_attribute("value")

    category = browser.find_element(By.NAME, "category")
    category.send_keys("square")
    browser.find_element(By.NAME, "k").clear()
    browser.find_element(By.NAME, "k").send_keys("5")
    browser.find_element(By.ID, "search").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours figure.hit")) == 5)
    wait.until(
        lambda d: all(natural_width(img) > 0 for img in d.find_elements(By.CSS_SELECTOR, "#neighbours img"))
    )

    hits = browser.find_elements(By.CSS_SELECTOR, "#neighbours figure.hit")
    assert all("square" in hit.text for hit in hits)
    assert picked not in [hit.get_attribute("data-product-id") for hit in hits]
    distances = [float(hit.find_element(By.CLASS_NAME, "distance").text) for hit in hits]
    assert distances == sorted(distances)
    assert (
        browser.find_element(By.CSS_SELECTOR, "#neighbours figure.query").get_attribute("data-product-id")
        == picked
    )
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTEFACTS / "gallery.png"))


def test_an_unknown_product_shows_an_error(server: str, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/?product=nope")
    WebDriverWait(browser, 20).until(lambda d: "not in the index" in d.find_element(By.ID, "status").text)
