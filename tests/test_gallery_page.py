"""What the server guarantees the web gallery, without a browser (tests/test_gallery.py drives one): the
page opens without a key and shows the currency setting; its policy runs only its own script and style;
its script writes a catalogue's text as text, keeps the key for the tab's session and sends it on every
request; and the listing it pages through reaches every product, filtered, refusing bad paging values."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from tests.helpers import MakeCatalogue, run_sync
from visrec.api import create_app
from visrec.config import ApiSettings, Settings

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture
def client(make_catalogue: MakeCatalogue, settings: Settings) -> Iterator[TestClient]:
    run_sync(make_catalogue(27), settings)
    api = ApiSettings(api_key=SecretStr(KEY["X-API-Key"]), currency="eur")
    with TestClient(create_app(settings.model_copy(update={"api": api}), torch.device("cpu"))) as test_client:
        yield test_client


def _script(page: str) -> str:
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 1
    return str(scripts[0])


def test_the_page_opens_without_a_key_with_the_currency_and_runs_only_its_own_script(
    client: TestClient,
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta name="visrec-currency" content="EUR">' in page.text
    policy = page.headers["content-security-policy"]
    digest = base64.b64encode(hashlib.sha256(_script(page.text).encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy  # this script, and no other
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "default-src 'none'" in policy
    assert "img-src 'self' blob:" in policy and "connect-src 'self'" in policy
    assert client.get("/products", params={"limit": 1}).status_code == 401  # the data needs the key


def test_the_script_writes_text_as_text_and_keeps_the_key_for_the_session(client: TestClient) -> None:
    script = _script(client.get("/").text)
    for markup in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert markup not in script, markup
    assert "sessionStorage.setItem(KEY" in script and "localStorage.setItem" not in script
    # Every request goes through one of two helpers that send the key, to this service's own paths.
    assert script.count("fetch(") == 2 and script.count("headers()") >= 2
    for call in re.findall(r"fetch\(([^,]+),", script):
        assert call.strip() == "path" or call.strip().startswith("`/products/"), call
    calls = re.findall(r"\bawait api\(([^,)]+)", script) + re.findall(r"\n\s+api\(([^,)]+)", script)
    assert len(calls) >= 4
    for call in calls:
        assert call.strip().startswith("`/"), call


def test_the_listing_pages_through_every_product_filtered(client: TestClient) -> None:
    def every(params: dict[str, str | int | list[str]]) -> list[str]:
        ids: list[str] = []
        after = None
        while True:
            cursor: dict[str, str] = {"after": after} if after else {}
            page = client.get("/products", params={**params, **cursor}, headers=KEY)
            assert page.status_code == 200, page.text
            ids += [p["product_id"] for p in page.json()["products"]]
            after = page.json()["next"]
            if after is None:
                return ids
            assert len(page.json()["products"]) == params["limit"]

    everything = every({"limit": 4})
    assert sorted(everything) == sorted(f"p{i}" for i in range(27)) and len(set(everything)) == 27
    squares = every({"limit": 2, "category": "square", "where": ["title=green square 7"]})
    assert squares == ["p7"]
    cheap = every({"limit": 3, "where": ["price=..15"]})  # prices 10.5, 11.5, …
    assert sorted(cheap) == ["p0", "p1", "p2", "p3", "p4"]


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "p3"}, "after"),
        ({"page": 2}, "page"),
        ({"where": "title"}, "FIELD=VALUE"),
    ],
)
def test_bad_paging_or_search_values_are_422(
    client: TestClient, params: dict[str, object], said: str
) -> None:
    answer = client.get("/products", params=params, headers=KEY)
    assert answer.status_code == 422 and said in answer.text, answer.text
