"""Security: the API key guards every route but the health probes; nothing outside the indexed images is
ever read or served through image paths (upload names, tampered payloads); catalogue rows outside the
configured roots are covered by test_bad_input.py, upload size and pixel limits by test_api.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from tests.helpers import MakeCatalogue, run_sync
from visrec.api import create_app
from visrec.config import ApiSettings, Settings
from visrec.index import open_index
from visrec.index.points import IndexPoint

# The probes, the gallery page (static HTML with no data in it, whose script sends the key it asks for),
# and the API's docs and schema (no data; the docs page's Authorize sends the key).
OPEN = {
    "/healthz",
    "/readyz",
    "/",
    "/docs",
    "/docs/oauth2-redirect",
    "/openapi.json",
    "/redoc",
    "/favicon.ico",
}


def test_every_route_but_health_and_the_static_page_needs_the_api_key(
    store: Settings, make_catalogue: MakeCatalogue
) -> None:
    """Fault: requests without the key, or with a wrong one, to every route the app declares (read from
    the app itself, so a route added later is covered). Checked: 401 everywhere but the two probes and
    the gallery's static page."""
    run_sync(make_catalogue(6), store)
    # Many wrong keys from one client: past the failed-authentication burst they would be 429.
    api = ApiSettings(api_key=SecretStr("s3cret"), auth_failure_burst=1000)
    settings = store.model_copy(update={"api": api})
    app = create_app(settings, torch.device("cpu"))
    routes = [
        (m, str(r.path))
        for r in iter_route_contexts(app.routes)  # included routers too (FastAPI >= 0.137 nests them)
        if isinstance(r.original_route, APIRoute)
        for m in sorted(r.methods or ())
    ]
    routes += [("GET", path) for path in ("/docs", "/openapi.json", "/redoc")]
    assert len(routes) >= 10
    with TestClient(app) as client:
        for method, path in routes:
            url = path.replace("{product_id:path}", "p1").replace("{product_id}", "p1").replace("{n}", "0")
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
                status = client.request(method, url, headers=headers).status_code
                assert status == (200 if path in OPEN else 401), (method, url, headers, status)
        assert client.get("/products/p1", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_the_image_route_serves_only_image_files(store: Settings, make_catalogue: MakeCatalogue) -> None:
    """Fault: a payload in the store names a file that is not a product photo (a shared server's
    collection tampered with, or a file swapped on disk). Checked: 404, and the file's bytes never
    appear in the answer."""
    catalogue = make_catalogue(3)
    run_sync(catalogue, store)
    secret = catalogue.parent / "secret.txt"
    secret.write_text("top secret\n")
    with open_index(store.qdrant) as index:
        for product_id, image in (
            ("evil-etc", "/etc/passwd"),
            ("evil-txt", str(secret)),
            ("evil-rel", "secret.txt"),
        ):
            index.upsert(
                [
                    IndexPoint(
                        product_id, np.zeros(1000, np.float32), {"product_id": product_id, "image": image}
                    )
                ]
            )
    with TestClient(create_app(store, torch.device("cpu"))) as client:
        for product_id in ("evil-etc", "evil-txt", "evil-rel"):
            response = client.get(f"/products/{product_id}/image")
            assert response.status_code == 404 and b"top secret" not in response.content, product_id
            assert b"root:" not in response.content
        assert client.get("/products/p1/image").status_code == 200


def test_an_upload_name_is_never_used_as_a_path(store: Settings, make_catalogue: MakeCatalogue) -> None:
    """Fault: uploads whose file name is a path (traversal, an existing file). visrec reads the uploaded
    bytes only. Checked: a real photo under a hostile name is searched (200) and nothing is written
    where the name points; an empty body named after an existing image is refused (422)."""
    catalogue = make_catalogue(6)
    run_sync(catalogue, store)
    photo = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(photo, "PNG")
    target = catalogue.parent / "planted.png"
    with TestClient(create_app(store, torch.device("cpu"))) as client:
        for name in ("../../../../tmp/planted.png", str(target), "..\\..\\planted.png"):
            response = client.post("/search/image", files={"image": (name, photo.getvalue(), "image/png")})
            assert response.status_code == 200, response.text
        existing = str(catalogue.parent / "images" / "p1.png")
        response = client.post("/search/image", files={"image": (existing, b"", "image/png")})
        assert response.status_code == 422
    assert not target.exists() and not Path("/tmp/planted.png").exists()
