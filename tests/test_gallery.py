"""The web gallery in a real browser: headless Chromium (Debian's chromium + chromium-driver) drives
the page served by a live uvicorn server on loopback: picks a product, sets a filter, checks results;
types the key once, pages and searches through every product, and shows a title that is markup as
text. A screenshot is kept under .visrec/test-artefacts/."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from pydantic import SecretStr

from tests.helpers import MakeCatalogue, draw_product, live_server, run_sync
from visrec.api import create_app
from visrec.config import ApiSettings, Settings

if TYPE_CHECKING:  # selenium is imported where a browser is driven (the tests skip without one)
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTEFACTS = Path(__file__).parents[1] / ".visrec" / "test-artefacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them when run as root)",
)


KEY = "s3cret-key"
# A catalogue's text that would run if the page ever took it for markup.
INJECTED = '<img src=x onerror="document.title=\'pwned\'"><b id="injected">bold</b>'


@pytest.fixture
def server(make_catalogue: MakeCatalogue, settings: Settings) -> Iterator[str]:
    run_sync(make_catalogue(27), settings)
    with live_server(create_app(settings, torch.device("cpu"))) as url:
        yield url


@pytest.fixture
def keyed_server(make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path) -> Iterator[str]:
    """27 products and one whose title is markup, behind an API key, prices in euros."""
    catalogue = make_catalogue(27)
    draw_product(tmp_path / "images" / "evil.png", "circle", "red")
    with catalogue.open("a") as f:
        csv.writer(f).writerow(["evil", "images/evil.png", "circle", "red", "99.95", INJECTED])
    run_sync(catalogue, settings)
    api = ApiSettings(api_key=SecretStr(KEY), currency="EUR")
    with live_server(create_app(settings.model_copy(update={"api": api}), torch.device("cpu"))) as url:
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


def test_the_key_is_asked_once_and_used_at_once(keyed_server: str, browser: WebDriver) -> None:
    """With a key set, the page asks for it, then shows the products without a reload: every later
    request (listing, photos, a search) sends it, and it is kept for the tab's session only."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(keyed_server + "/?product=p4")  # a link with a search waiting for the key
    key_form = browser.find_element(By.ID, "key-form")
    status = browser.find_element(By.ID, "status")
    wait.until(lambda d: key_form.is_displayed() and "needs an API key" in status.text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#catalogue figure")

    key_form.find_element(By.NAME, "key").send_keys("wrong")
    browser.find_element(By.ID, "use-key").click()
    wait.until(lambda d: "was refused" in status.text and key_form.is_displayed())

    key_form.find_element(By.NAME, "key").send_keys(KEY)
    browser.find_element(By.ID, "use-key").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalogue figure")) == 24)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours figure.hit")) == 8)  # the link's
    photos = "#catalogue img"  # fetched with the key: loaded
    wait.until(lambda d: all(natural_width(i) > 0 for i in d.find_elements(By.CSS_SELECTOR, photos)))
    assert not key_form.is_displayed() and status.text == ""
    assert browser.execute_script("return sessionStorage.getItem('visrec-key')") == KEY
    assert browser.execute_script("return localStorage.getItem('visrec-key')") is None

    browser.find_element(By.ID, "next").click()  # later requests carry it too
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalogue figure")) == 4)
    browser.refresh()  # the same tab keeps it: not asked again
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalogue figure")) == 24)
    assert not browser.find_element(By.ID, "key-form").is_displayed()


def test_paging_and_search_reach_every_product_with_titles_and_prices(
    keyed_server: str, browser: WebDriver
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(keyed_server + "/")
    browser.execute_script("sessionStorage.setItem('visrec-key', arguments[0])", KEY)
    browser.refresh()

    def page_ids() -> list[str]:  # read in one script: the grid is replaced as pages arrive
        ids = browser.execute_script(
            "return [...document.querySelectorAll('#catalogue figure')].map(f => f.dataset.productId)"
        )
        assert isinstance(ids, list)
        return [str(i) for i in ids]

    wait.until(lambda d: len(page_ids()) == 24)
    seen = page_ids()
    browser.find_element(By.ID, "next").click()
    wait.until(lambda d: len(page_ids()) == 4)
    seen += page_ids()
    assert sorted(seen) == sorted([f"p{i}" for i in range(27)] + ["evil"])  # every product, once
    assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None
    browser.find_element(By.ID, "prev").click()
    wait.until(lambda d: len(page_ids()) == 24)

    # The title and the price as the catalogue wrote them, the price in the configured currency.
    figure = browser.find_element(By.CSS_SELECTOR, '#catalogue figure[data-product-id="p3"]')
    assert figure.find_element(By.CLASS_NAME, "title").text == "blue circle 3"
    price = figure.find_element(By.CLASS_NAME, "price").text
    assert "13.50" in price and ("€" in price or "EUR" in price), price

    # Search: the filters narrow the listing, then page through what matches.
    browser.find_element(By.NAME, "category").send_keys("square")
    browser.find_element(By.NAME, "where").send_keys("colour=green")
    browser.find_element(By.ID, "browse").click()
    wait.until(lambda d: sorted(page_ids()) == ["p16", "p25", "p7"])
    assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None

    # A filter no product meets says what there is, in the status line.
    browser.find_element(By.NAME, "where").clear()
    browser.find_element(By.NAME, "where").send_keys("colour=mauve")
    browser.find_element(By.ID, "browse").click()
    wait.until(lambda d: "mauve" in d.find_element(By.ID, "status").text)
    assert page_ids() == []  # the earlier search's cards do not stay under the error (outside trial)


def test_a_catalogues_markup_stays_text(keyed_server: str, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(keyed_server + "/?where=category%3Dcircle")
    browser.execute_script("sessionStorage.setItem('visrec-key', arguments[0])", KEY)
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#catalogue figure[data-product-id="evil"]'))
    figure = browser.find_element(By.CSS_SELECTOR, '#catalogue figure[data-product-id="evil"]')
    figure.click()  # its caption among the results too
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#neighbours figure.query[data-product-id="evil"]'))
    wait.until(lambda d: natural_width(d.find_element(By.CSS_SELECTOR, "#neighbours figure.query img")) > 0)
    assert figure.find_element(By.CLASS_NAME, "title").text == INJECTED
    assert not browser.find_elements(By.ID, "injected")
    assert browser.title == "visrec gallery"
