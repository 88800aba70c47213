"""The HTTP API through FastAPI's test client, on a real embedded index and a real model."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import SecretStr

from tests.helpers import MakeCatalogue, run_reindex, run_sync, small_settings, write_catalogue, write_shop
from visrec import query
from visrec.api import create_app
from visrec.artefact import Manifest
from visrec.config import ApiSettings, Settings
from visrec.errors import NoMatch
from visrec.filters import Filters, Where


@pytest.fixture
def synced(make_catalogue: MakeCatalogue, settings: Settings) -> Settings:
    run_sync(make_catalogue(27), settings)  # 3 shapes x 3 colours, prices 10.5 … 36.5
    return settings


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of `client`'s store and photos."""
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def client(root: Path, artefact: tuple[Path, Manifest]) -> Iterator[TestClient]:
    """The API on a store synced from 27 drawn products (3 shapes x 3 colours, prices 10.5 … 36.5): one
    for the module's tests that only read (a test that writes, or counts requests, makes its own)."""
    settings = small_settings(root, artefact=artefact[0])
    run_sync(write_catalogue(root, 27), settings)
    with TestClient(create_app(settings, torch.device("cpu"))) as test_client:
        yield test_client


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["points"] == 27 and ready["model_version"].startswith("resnet18-")


def test_readiness_shows_the_live_versions_quality_figures(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """After a reindex, /readyz shows the figures the quality gate measured for the live version and the
    version it replaced (on the same queries), and nothing an anonymous caller should not see."""
    catalogue = make_catalogue(12)
    run_sync(catalogue, settings)
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        assert client.get("/readyz").json()["quality"] is None  # a sync measures nothing
    summary = run_reindex(catalogue, settings, settings.artefact)  # the same model: passed
    assert summary.gate is not None and summary.gate.new is not None
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        response = client.get("/readyz")
    assert response.status_code == 200
    quality = response.json()["quality"]
    model = quality["model_version"]
    assert quality == {
        "model_version": model,
        "p_at_10": round(summary.gate.new.p_at_10, 4),
        "map_at_10": round(summary.gate.new.map_at_10, 4),
        "queries": 12,
        "query_set": "sample",
        "measured_at": quality["measured_at"],
        "compared_with": {
            "model_version": model,
            "p_at_10": quality["p_at_10"],
            "map_at_10": quality["map_at_10"],
        },
    }
    assert str(tmp_path) not in response.text and "products__v" not in response.text


def test_similar_with_filters(client: TestClient) -> None:
    response = client.get("/products/p4/similar", params={"k": 5, "colour": ["red", "blue"], "price_max": 30})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 5 and "p4" not in [r["product_id"] for r in results]
    assert all(r["payload"]["colour"] in {"red", "blue"} and r["payload"]["price"] <= 30 for r in results)
    assert all("content_hash" not in r["payload"] for r in results)
    distances = [r["distance"] for r in results]
    assert distances == sorted(distances)


def test_product_and_image_search(client: TestClient, root: Path) -> None:
    assert client.get("/products/p7").json()["payload"]["category"] == "square"
    photo = (root / "images" / "p7.png").read_bytes()
    response = client.post(
        "/search/image", files={"image": ("p.png", photo, "image/png")}, params={"k": 3, "category": "square"}
    )
    assert response.status_code == 200, response.text
    first = response.json()["results"][0]
    assert first["product_id"] == "p7" and first["distance"] == pytest.approx(0, abs=1e-3)


def test_recommend_from_positives_and_negatives(client: TestClient) -> None:
    body = {"positive": ["p0", "p3"], "negative": ["p1"], "k": 4, "category": ["circle", "triangle"]}
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    ids = [r["product_id"] for r in response.json()["results"]]
    assert len(ids) == 4 and not {"p0", "p3", "p1"} & set(ids)
    assert all(r["payload"]["category"] in {"circle", "triangle"} for r in response.json()["results"])


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("get", "/products/nope/similar", {}, 404),
        ("get", "/products/nope", {}, 404),
        ("get", "/products/p1/similar", {"params": {"k": 0}}, 422),
        ("get", "/products/p1/similar", {"params": {"price_min": "cheap"}}, 422),
        ("post", "/search/image", {"files": {"image": ("x.png", b"not an image", "image/png")}}, 422),
        ("post", "/search/image", {}, 422),
        ("post", "/recommend", {"json": {"positive": []}}, 422),
        ("post", "/recommend", {"json": {"positive": ["nope"]}}, 404),
    ],
)
def test_errors_map_to_status_codes(
    client: TestClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def _encoded(mode: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 90).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt", "status"),
    [
        ("I;16B", "TIFF", 200),  # big-endian 16-bit: was converted outside the guarded code, a 500
        ("F", "TIFF", 200),
        ("I", "TIFF", 200),
        ("1", "BMP", 200),
        ("CMYK", "JPEG", 200),
        ("LA", "PNG", 200),
        ("RGB", "EPS", 422),  # would run Ghostscript: not a format visrec decodes
        ("RGB", "ICO", 422),
        ("RGB", "PCX", 422),
    ],
)
def test_uploads_in_odd_modes_and_formats_never_give_a_500(
    client: TestClient, mode: str, fmt: str, status: int
) -> None:
    files = {"image": (f"x.{fmt.lower()}", _encoded(mode, fmt), "application/octet-stream")}
    response = client.post("/search/image", files=files, params={"k": 2})
    assert response.status_code == status, response.text


def test_upload_limits(synced: Settings) -> None:
    settings = synced.model_copy(
        update={"api": ApiSettings(max_upload_bytes=2_000, max_upload_pixels=10_000)}
    )
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        big = io.BytesIO()
        Image.effect_noise((200, 200), 60).save(big, "PNG")
        response = client.post("/search/image", files={"image": ("big.png", big.getvalue(), "image/png")})
        assert response.status_code == 413
        wide = io.BytesIO()
        Image.new("1", (400, 400)).save(wide, "PNG")  # few bytes, too many pixels
        response = client.post("/search/image", files={"image": ("wide.png", wide.getvalue(), "image/png")})
        assert response.status_code == 422 and "above the limit" in response.json()["detail"]


def test_api_key_guards_all_but_health(synced: Settings) -> None:
    settings = synced.model_copy(update={"api": ApiSettings(api_key=SecretStr("s3cret"))})
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for path in ("/docs", "/openapi.json"):  # no data: open, and the schema declares the key
            assert client.get(path).status_code == 200, path
        # The docs pages load their scripts from this service, never from a CDN (blank offline).
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            scripts = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert scripts and all(s.startswith("/docs/static/") for s in scripts), (page, scripts)
            for script in scripts:
                served = client.get(script)
                assert served.status_code == 200 and len(served.content) > 1000, script
        assert client.get("/docs/static/..%2F__init__.py").status_code in (401, 404)
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKey"] == {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
        }
        assert schema["paths"]["/products/{product_id}/similar"]["get"]["security"] == [{"APIKey": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]
        for path in ("/products/p1", "/products/p1/similar", "/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 401, path
        assert client.get("/products/p1/similar", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_not_ready_without_a_collection_then_503(settings: Settings) -> None:
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
        response = client.get("/products/p1/similar")
        assert response.status_code == 503 and "visrec sync" in response.json()["detail"]


def test_metrics_count_requests(synced: Settings) -> None:
    with TestClient(create_app(synced, torch.device("cpu"))) as client:  # its own: counted from zero
        client.get("/products/p1/similar")
        client.get("/products/nope/similar")
        text = client.get("/metrics").text
    assert (
        'visrec_requests_total{method="GET",route="/products/{product_id}/similar",status="200"} 1.0' in text
    )
    assert 'status="404"' in text and "visrec_request_seconds_bucket" in text


def test_openapi_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/products/{product_id}/similar", "/search/image", "/recommend", "/healthz"} <= set(paths)


def test_browse_products_page_by_page(client: TestClient) -> None:
    first = client.get("/products", params={"limit": 4, "category": "circle"}).json()
    assert len(first["products"]) == 4 and first["next"]
    rest = client.get("/products", params={"limit": 50, "category": "circle", "after": first["next"]}).json()
    ids = [p["product_id"] for p in first["products"] + rest["products"]]
    assert sorted(ids) == sorted(f"p{i}" for i in range(0, 27, 3)) and rest["next"] is None


def test_product_image_and_gallery_page(client: TestClient, root: Path) -> None:
    image = client.get("/products/p2/image")
    assert image.status_code == 200 and image.content == (root / "images" / "p2.png").read_bytes()
    assert client.get("/products/nope/image").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and "visrec" in page.text and "/similar" in page.text


def test_colour_weight_parameter(client: TestClient) -> None:
    colour = client.get("/products/p4").json()["payload"]["colour_extracted"]
    results = client.get("/products/p4/similar", params={"k": 8, "colour_weight": 1}).json()["results"]
    assert all(r["payload"]["colour_extracted"] == colour for r in results)
    assert client.get("/products/p4/similar", params={"colour_weight": 1.5}).status_code == 422


def test_callers_never_see_server_paths_or_internal_fields(client: TestClient, root: Path) -> None:
    for response in (
        client.get("/products/p1"),
        client.get("/products/p1/similar", params={"k": 5}),
        client.get("/products", params={"limit": 5}),
    ):
        assert response.status_code == 200
        assert str(root) not in response.text and "content_hash" not in response.text
        assert "colour_lab" not in response.text and '"image"' not in response.text
    payload = client.get("/products/p1").json()["payload"]
    assert {"category", "colour", "price", "title", "colour_rgb"} <= set(payload)


def test_public_fields_restrict_what_callers_see(synced: Settings) -> None:
    settings = synced.model_copy(update={"api": ApiSettings(public_fields=["category", "price", "image"])})
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        assert set(client.get("/products/p1").json()["payload"]) == {"category", "price"}  # never "image"


def test_callers_filter_only_on_fields_they_are_shown(synced: Settings) -> None:
    """With `public_fields` narrowed to category, a filter on colour or price (or the colour re-rank)
    would let a caller probe values it is not shown, one query at a time: 422 on every route that
    filters; filtering on category still works."""
    settings = synced.model_copy(update={"api": ApiSettings(public_fields=["category"])})
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        photo = {"image": ("p.png", b"x", "image/png")}
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("get", "/products/p1/similar", {"params": {"colour": "red"}}),
            ("get", "/products/p1/similar", {"params": {"price_max": 20}}),
            ("get", "/products/p1/similar", {"params": {"colour_weight": 0.5}}),
            ("get", "/products", {"params": {"price_min": 1}}),
            ("post", "/search/image", {"params": {"colour": "red"}, "files": photo}),
            ("post", "/recommend", {"json": {"positive": ["p1"], "price_max": 20}}),
            ("post", "/recommend", {"json": {"positive": ["p1"], "max_per": ["colour=1"]}}),
            ("get", "/products", {"params": {"where": "colour=red"}}),
            ("get", "/products/p1/similar", {"params": {"where": "price=1..50"}}),
            ("post", "/recommend", {"json": {"positive": ["p1"], "where": ["title=red circle 0"]}}),
            ("get", "/products", {"params": {"where": "image=x"}}),  # never shown, whatever the setting
        ]
        for method, path, kwargs in cases:
            response = getattr(client, method)(path, **kwargs)
            assert response.status_code == 422, (path, kwargs, response.text)
            assert "not a field this service shows" in response.text or "does not show" in response.text
        shown = client.get("/products/p1/similar", params={"category": "circle", "k": 3})
        assert shown.status_code == 200 and len(shown.json()["results"]) == 3


def test_errors_carry_a_request_id_and_5xx_hide_the_cause(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings, torch.device("cpu"))) as client:  # nothing synced: 503
        response = client.get("/products/p1/similar", headers={"X-Request-ID": "trace-42"})
        body = response.json()
        assert response.status_code == 503 and body["request_id"] == "trace-42"
        assert response.headers["x-request-id"] == "trace-42"
        assert str(tmp_path) not in response.text and "qdrant" not in response.text
        ready = client.get("/readyz").json()
        assert str(tmp_path) not in json.dumps(ready)
        assert len(client.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"]) == 32


def test_a_remote_image_is_served_through_the_api_not_redirected(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """A redirect would send callers (and their X-API-Key) to the catalogue's image host; the API
    fetches the photo itself, through the same guard as a sync."""
    import functools
    import http.server
    import threading

    make_catalogue(3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/p1.png"
        (tmp_path / "remote.csv").write_text(f"id,image,category\nr1,{url},circle\nr2,images/p2.png,circle\n")
        allowed = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update={"allowed_hosts": ["127.0.0.1"]})}
        )
        run_sync(tmp_path / "remote.csv", allowed, max_delete=1.0)
        with TestClient(create_app(allowed, torch.device("cpu")), follow_redirects=False) as client:
            image = client.get("/products/r1/image")
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert image.content == (tmp_path / "images" / "p1.png").read_bytes()
        with TestClient(create_app(settings, torch.device("cpu")), follow_redirects=False) as client:
            refused = client.get("/products/r1/image")  # the host is no longer allowed: not fetched
            assert refused.status_code == 502 and "not available" in refused.json()["detail"]
            assert "127.0.0.1" not in refused.text and "p1.png" not in refused.text  # nor its URL
    finally:
        server.shutdown()


def test_an_empty_api_key_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from visrec.cli import app

    monkeypatch.setenv("VISREC_API__API_KEY", "")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "VISREC_API__API_KEY" in result.stderr
    assert "Traceback" not in result.output


def test_an_optional_rate_limit_per_caller(synced: Settings) -> None:
    settings = synced.model_copy(update={"api": ApiSettings(rate_limit_per_s=1, rate_limit_burst=3)})
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        statuses = [client.get("/products/p1").status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
        limited = client.get("/products/p1")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["request_id"]
        assert client.get("/healthz").status_code == 200  # the probes are never limited
        # The client is its address, not what it says of itself: a new X-API-Key each time (no key is
        # configured) is the same client.
        for fresh in ("another caller", "a third", ""):
            assert client.get("/products/p1", headers={"X-API-Key": fresh}).status_code == 429


def test_wrong_keys_are_limited_and_the_right_one_still_passes(synced: Settings) -> None:
    """Key guessing, rotating the key at every try, from one client: 401 for the first
    `auth_failure_burst` wrong keys, then 429 with Retry-After (no rate limit configured); the right key
    still passes, and the probes are never limited."""
    api = ApiSettings(api_key=SecretStr("s3cret"), auth_failure_per_s=0.5, auth_failure_burst=4)
    with TestClient(create_app(synced.model_copy(update={"api": api}), torch.device("cpu"))) as client:
        statuses = [
            client.get("/products/p1", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(7)
        ]
        assert statuses == [401] * 4 + [429] * 3, statuses
        limited = client.get("/products/p1")  # no key at all: a failed authentication too
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert "failed authentications" in limited.json()["detail"]
        assert client.get("/products/p1", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_rate_limits_key_on_the_client_address() -> None:
    from visrec.guard import _client

    assert _client({"client": ("203.0.113.7", 5000)}) == b"203.0.113.7"
    assert _client({"client": ("::ffff:203.0.113.7", 1)}) == b"203.0.113.7"
    # One IPv6 host is given a /64: rotating within it is one client.
    assert _client({"client": ("2001:db8:1:2::1", 1)}) == _client({"client": ("2001:db8:1:2:ffff::9", 2)})
    assert _client({"client": ("2001:db8:1:2::1", 1)}) != _client({"client": ("2001:db8:1:3::1", 1)})
    assert _client({"client": None}) == b""


def test_the_rate_limiter_refills_and_forgets() -> None:
    from visrec.guard import RateLimiter

    limiter = RateLimiter(per_s=2, burst=2)
    assert [limiter.wait_s(b"a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert limiter.wait_s(b"a", 0.5) == 0.0  # one token back after half a second
    limiter.MAX_CALLERS = 2
    for caller in (b"b", b"c", b"d"):
        limiter.wait_s(caller, 1.0)
    assert len(limiter._buckets) == 2


def test_readiness_recovers_when_the_model_appears(
    make_catalogue: MakeCatalogue, settings: Settings, tmp_path: Path
) -> None:
    """A model that failed to load is retried at each check: no restart needed once it is there."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(settings.artefact, model)
    settings = settings.model_copy(
        update={"artefact": model, "api": settings.api.model_copy(update={"alias_check_s": 0})}
    )
    run_sync(make_catalogue(6), settings)
    model.rename(tmp_path / "model-away")
    photo = {"image": ("p.png", (tmp_path / "images" / "p1.png").read_bytes(), "image/png")}
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "model" in ready.json()["problems"][0]
        assert str(tmp_path) not in ready.text
        assert client.get("/products/p1/similar").status_code == 200  # product queries still work
        assert client.post("/search/image", files=photo).status_code == 503
        (tmp_path / "model-away").rename(model)
        assert client.get("/readyz").status_code == 200
        assert client.post("/search/image", files=photo).status_code == 200


def test_scrub_blanks_urls_and_paths_in_what_callers_are_told() -> None:
    from visrec.api.errors import scrub

    said = scrub(
        {
            "detail": "https://cdn.example/p.jpg?sig=abc: refused; /srv/shop/photos/p.jpg: gone; C:\\x\\y",
            "loc": ["query", "k"],
        }
    )
    assert said == {"detail": "… refused; … gone; …", "loc": ["query", "k"]}
    assert scrub("product 'a/b' is not in the index") == "product 'a/b' is not in the index"
    assert scrub(["k must be between 1 and 1000", 3]) == ["k must be between 1 and 1000", 3]


ODD_IDS = ["a/b", "x/similar", "images/1", "50%off", "a%2Fb", "/lead", "trail/", "ü/ß ?#&", ".", "a b/image"]


def test_every_id_the_catalogue_takes_is_reachable_on_every_route(settings: Settings, tmp_path: Path) -> None:
    """Ids with '/', a route's suffix, '%', an encoded slash as text, spaces, '?', '#', '.': each is
    indexed, and every product route reaches it with the id percent-encoded as one path segment; an
    id with '/' also plainly where the path stays unambiguous. (A '/' in an id was a 404 from routing.)"""
    from urllib.parse import quote

    from tests.helpers import draw_product, write_csv

    rows = []
    for i, product_id in enumerate(ODD_IDS):
        draw_product(tmp_path / "images" / f"o{i}.png", "circle", "red", variant=i)
        rows.append({"id": product_id, "image": f"images/o{i}.png", "category": "odd"})
    summary = run_sync(write_csv(tmp_path / "odd.csv", rows), settings)
    assert summary.added == len(ODD_IDS) and not summary.failed, summary
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        for i, product_id in enumerate(ODD_IDS):
            encoded = quote(product_id, safe="").replace(".", "%2E")
            got = client.get(f"/products/{encoded}")
            assert got.status_code == 200 and got.json()["product_id"] == product_id, (product_id, got.text)
            similar = client.get(f"/products/{encoded}/similar", params={"k": 3})
            assert similar.status_code == 200, (product_id, similar.text)
            assert product_id not in [h["product_id"] for h in similar.json()["results"]]
            image = (tmp_path / "images" / f"o{i}.png").read_bytes()
            for path in (f"/products/{encoded}/image", f"/products/{encoded}/images/0"):
                photo = client.get(path)
                assert photo.status_code == 200 and photo.content == image, (path, photo.text)
        # Plainly, where the path stays unambiguous: the suffix routes win over an id's last part.
        assert client.get("/products/a/b").json()["product_id"] == "a/b"
        assert client.get("/products/a/b/similar").status_code == 200
        assert client.get("/products/images/1").json()["product_id"] == "images/1"
        assert client.get("/products/x/similar").status_code == 404  # similar to "x", which is not indexed
        metrics = client.get("/metrics").text
        assert 'route="/products/{product_id}/similar"' in metrics and ":path" not in metrics


def test_the_contract_says_what_is_refused(client: TestClient) -> None:
    """What the schema allows is answered, what it refuses is refused: an empty price range (price_min
    above price_max: JSON Schema cannot order two parameters) matches nothing, on every route that
    filters; max_per's FIELD=N is a pattern in the schema; a 405 says which methods the route takes."""
    empty = {"price_min": 30, "price_max": 10}
    note = "price 30..10 takes nothing: its low end is above its high end"
    assert client.get("/products/p1/similar", params=empty).json() == {"results": [], "note": note}
    assert client.get("/products", params=empty).json() == {"products": [], "next": None, "note": note}
    assert client.post("/recommend", json={"positive": ["p1"], **empty}).json() == {
        "results": [],
        "note": note,
    }
    photo = {"image": ("p.png", _encoded("RGB", "PNG"), "image/png")}
    assert client.post("/search/image", params=empty, files=photo).json() == {"results": [], "note": note}
    schema = client.get("/openapi.json").json()
    similar = schema["paths"]["/products/{product_id}/similar"]["get"]["parameters"]
    max_per = next(p for p in similar if p["name"] == "max_per")["schema"]
    assert max_per["items"]["pattern"] == query.CAP_PATTERN and max_per["maxItems"] == query.MAX_CAPS
    body = schema["components"]["schemas"]["RecommendRequest"]["properties"]["max_per"]
    assert body["items"]["pattern"] == query.CAP_PATTERN
    for method, path, allow in [("delete", "/products", "GET"), ("put", "/recommend", "POST")]:
        refused = client.request(method, path)
        assert refused.status_code == 405 and refused.headers["allow"] == allow, refused.headers
        assert refused.json()["request_id"]


@hypothesis_settings(max_examples=int(os.environ.get("VISREC_CAP_EXAMPLES", "300")), deadline=None)
@given(
    st.one_of(
        st.text(max_size=20),
        st.from_regex(query.CAP_PATTERN, fullmatch=True),
        st.builds(
            "{}{}={}{}".format,
            st.sampled_from(["", " ", "\t", "\n"]),
            st.sampled_from(["brand", "image", "images", "colour_lab ", "a b", "\ufeffx", "\x1cx"]),
            st.integers(-2, 1002).map(str) | st.sampled_from(["0007", "x", ""]),
            st.sampled_from(["", " ", "\n", "\t"]),
        ),
    )
)
def test_max_per_pattern_in_the_schema_is_the_rule(cap: str) -> None:
    """The schema's pattern for one cap, read as JSON Schema reads it (ECMAScript regular expressions,
    by the validator Schemathesis uses), accepts exactly the caps `Rules` accepts."""
    valid = jsonschema_rs.validator_for({"type": "string", "pattern": query.CAP_PATTERN}).is_valid(cap)
    try:
        query.Rules(max_per=[cap])
        accepted = True
    except ValueError:
        accepted = False
    assert valid == accepted, repr(cap)


# --- filters on any shown field, and no silent empty answer (a shop's catalogue) ---------------------------

WHERE_CASES = [
    ["in_stock=true"],
    ["in_stock=false", "brand=acme"],
    ["size=40"],
    ["price=20..40"],
    ["price=..30", "in_stock=true"],
    ["colour=navy"],
    ["brand=acmee"],  # no such value: an error on both
    ["brnd=acme"],  # no such field
    ["size=38..40"],  # a range on the CSV's text
]


@pytest.fixture(scope="module")
def shop(
    tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> Iterator[tuple[TestClient, list[Any]]]:
    """The API on a shop's 12 products (CSV: its own columns as text), and what the real CLI answered,
    before the service took the store, for each of WHERE_CASES: its JSON hits, or (exit code, error)."""
    from typer.testing import CliRunner

    from visrec.cli import app

    root = tmp_path_factory.mktemp("shop")
    settings = small_settings(root, artefact=artefact[0])
    run_sync(write_shop(root), settings)
    env = {
        "VISREC_ARTEFACT": str(settings.artefact),
        "VISREC_QDRANT__PATH": str(settings.qdrant.path),
        "VISREC_EMBED__DEVICE": "cpu",
    }
    cli: list[Any] = []
    for clauses in WHERE_CASES:
        args = ["similar", "s1", "-k", "12", "--json", *[a for c in clauses for a in ("--where", c)]]
        result = CliRunner().invoke(app, args, env=env)
        cli.append(json.loads(result.stdout) if result.exit_code == 0 else (result.exit_code, result.stderr))
    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        yield client, cli


def test_where_over_http_is_the_clis_where(shop: tuple[TestClient, list[Any]]) -> None:
    """`where=` on the HTTP routes answers what `visrec similar --where` answered on the same store: the
    same products at the same distances, or the same mistake (422 / exit 2)."""
    client, cli = shop
    for clauses, by_cli in zip(WHERE_CASES, cli, strict=True):
        response = client.get("/products/s1/similar", params={"k": 12, "where": clauses})
        if isinstance(by_cli, tuple):
            code, said = by_cli
            assert code == 2 and response.status_code == 422 and response.json()["error"] == "NoMatch", (
                clauses
            )
            assert response.json()["detail"].split("; fields")[0] in " ".join(said.split()), clauses
            continue
        assert response.status_code == 200, (clauses, response.text)
        got = [(h["product_id"], round(h["distance"], 4)) for h in response.json()["results"]]
        assert got == [(h["product_id"], round(h["distance"], 4)) for h in by_cli] and got, clauses
        body = {"positive": ["s1"], "k": 12, "where": clauses}
        recommended = client.post("/recommend", json=body).json()["results"]
        assert {h["product_id"] for h in recommended} == {h for h, _ in got}, clauses


def test_http_filter_mistakes_name_what_was_meant(shop: tuple[TestClient, list[Any]]) -> None:
    """Every mistake, its status and its message: an unknown parameter or body field names the one it
    misspells or the `where` meant; a condition no product meets names the values or fields there are;
    conditions that only together match nothing are an empty answer saying so."""
    client, _ = shop
    photo = {"image": ("p.png", _encoded("RGB", "PNG"), "image/png")}
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("get", "/products/s1/similar", {"params": {"categroy": "shirt"}}, "did you mean 'category'?"),
        ("get", "/products/s1/similar", {"params": {"color": "red"}}, "did you mean 'colour'?"),
        ("get", "/products/s1/similar", {"params": {"in_stock": "true"}}, "send where=in_stock=true"),
        ("get", "/products", {"params": {"brand": "acme"}}, "send where=brand=acme"),
        ("post", "/search/image", {"params": {"colour_wieght": "1"}, "files": photo}, "'colour_weight'"),
        ("get", "/products/s1", {"params": {"k": "3"}}, "unknown parameter 'k'; known: none"),
        ("post", "/recommend", {"json": {"positive": ["s1"], "categroy": ["shirt"]}}, "'category'?"),
        (
            "post",
            "/recommend",
            {"json": {"positive": ["s1"], "in_stock": True}},
            '"where": ["in_stock=true"]',
        ),
        (
            "get",
            "/products/s1/similar",
            {"params": {"category": "Shirt"}},
            "(did you mean 'shirt'?); category",
        ),
        ("get", "/products", {"params": {"colour": "rde"}}, "(did you mean 'red'?); colour has green (4)"),
        (
            "get",
            "/products",
            {"params": {"where": "brnd=acme"}},
            "no field 'brnd' is known (did you mean 'brand'",
        ),
        ("post", "/search/image", {"params": {"where": "brand=acmee"}, "files": photo}, "brand has acme (6)"),
        ("post", "/recommend", {"json": {"positive": ["s1"], "where": ["size=1..2"]}}, "size holds text"),
        ("get", "/products", {"params": {"where": "brand"}}, "where takes FIELD=VALUE"),
        ("get", "/products", {"params": {"where": [f"f{i}=1" for i in range(11)]}}, "at most 10"),
    ]
    for method, path, kwargs, said in cases:
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == 422, (path, kwargs, response.text)
        detail = response.json()["detail"]
        told = detail if isinstance(detail, str) else " ".join(problem["msg"] for problem in detail)
        assert said in told, (path, kwargs, told)
        assert "Traceback" not in response.text and response.json()["request_id"]
    fields = client.get("/products", params={"where": "brnd=acme"}).json()["detail"]
    assert "product_id" not in fields and "source" not in fields  # fields callers are not shown: unnamed
    together = client.get("/products/s1/similar", params={"category": "shirt", "colour": "navy"})
    assert together.status_code == 200
    assert together.json() == {
        "results": [],
        "note": "each filter matches some product, but no product meets them all together",
    }
    page = client.get("/products", params={"where": ["brand=zeta", "price=..30"]}).json()
    assert page["products"] == [] and "all together" in page["note"]
    assert client.get("/products", params={"where": "brand=zeta"}).json()["note"] is None
    # The probes answer whatever query a load balancer adds; the gallery page's own URL is no API call.
    assert client.get("/healthz", params={"ts": "1"}).status_code == 200
    assert client.get("/", params={"product": "s1", "category": "shirt"}).status_code == 200


ROUTES = ["/products/s1/similar", "/products", "/search/image", "/products/s1"]


@hypothesis_settings(max_examples=int(os.environ.get("VISREC_QUERY_EXAMPLES", "60")), deadline=None)
@given(
    route=st.sampled_from(ROUTES),
    name=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12),
    value=st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
)
def test_any_unknown_query_parameter_is_a_422_naming_it(
    shop: tuple[TestClient, list[Any]], route: str, name: str, value: str
) -> None:
    """Whatever its name or value, a query parameter the route does not publish is refused, named."""
    from visrec.api.errors import scrub

    client, _ = shop
    known = {
        p["name"]
        for p in client.get("/openapi.json")
        .json()["paths"][route.replace("s1", "{product_id}")]["get" if route != "/search/image" else "post"]
        .get("parameters", [])
    }
    if name in known:
        return
    photo = {"files": {"image": ("p.png", _encoded("RGB", "PNG"), "image/png")}}
    method = "post" if route == "/search/image" else "get"
    response = getattr(client, method)(route, params={name: value}, **(photo if method == "post" else {}))
    assert response.status_code == 422, response.text
    problem = response.json()["problems"][0]
    detail = response.json()["detail"]  # one sentence, naming it (scrubbed as a whole)
    assert detail.startswith("query parameter ") and ": unknown parameter " in detail, detail
    # Named as sent (what looks like a path or a URL blanked, as in every answer: `scrub`).
    assert problem["loc"] == scrub(["query", name]) and problem["msg"].startswith("unknown parameter ")


_SHOWN = ["category", "colour", "price", "brand", "in_stock", "size", "title", "nope"]
_VALUES = ["shirt", "navy", "acme", "Acme", "zeta", "true", "false", "40", "38", "25", "20..40", "..30", "x"]


@hypothesis_settings(max_examples=int(os.environ.get("VISREC_QUERY_EXAMPLES", "60")), deadline=None)
@given(
    st.lists(
        st.builds("{}={}".format, st.sampled_from(_SHOWN), st.sampled_from(_VALUES)), min_size=1, max_size=3
    )
)
def test_any_where_on_a_shown_field_filters_exactly_as_the_cli(
    shop: tuple[TestClient, list[Any]], clauses: list[str]
) -> None:
    """Any `where` on a shown field: the HTTP answer is the CLI's (`Filters.parse` then the query, as
    `visrec similar --where` runs them) on the same live index, and exactly the products the rule keeps
    (`Where.matches`); a condition no product meets is a 422 there and `NoMatch` here."""
    client, _ = shop
    response = client.get("/products/s1/similar", params={"k": 12, "where": clauses})
    with client.app.state.service.reading() as live:  # type: ignore[attr-defined]
        try:
            hits = query.similar_to_product(live.index, "s1", 12, Filters.parse(where=clauses))
        except NoMatch:
            assert response.status_code == 422 and response.json()["error"] == "NoMatch", response.text
            return
        payloads = {pid: payload for pid, payload in live.index.browse(Filters(), 100)[0] if pid != "s1"}
    assert response.status_code == 200, response.text
    assert [h["product_id"] for h in response.json()["results"]] == [h.product_id for h in hits]
    wheres = [Where.parse(c) for c in clauses]
    keep = {p for p, v in payloads.items() if all(w.field in v and w.matches(v[w.field]) for w in wheres)}
    assert {h.product_id for h in hits} == keep
    assert (response.json()["note"] is None) == bool(keep)
