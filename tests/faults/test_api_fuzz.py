"""The HTTP API under bounded, seeded fuzzing: random ids, query strings, filter values, JSON bodies,
upload bodies and headers on every route. Nothing may answer 5xx and the service must stay up."""

from __future__ import annotations

import io
import json
import os
import random
import string
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.faults.helpers import SEED, figure
from tests.helpers import MakeCatalogue, run_sync
from visrec.api import create_app
from visrec.config import ApiSettings, Settings

REQUESTS = int(os.environ.get("VISREC_FAULTS_FUZZ_REQUESTS", "500"))
PRODUCTS = 27


@pytest.fixture
def client(store: Settings, make_catalogue: MakeCatalogue) -> Iterator[TestClient]:
    """The API on an index of 27 synced products, with small upload limits so that they are hit.
    Server exceptions come back as 500 responses (counted) instead of being raised."""
    run_sync(make_catalogue(PRODUCTS), store)
    settings = store.model_copy(
        update={"api": ApiSettings(max_upload_bytes=200_000, max_upload_pixels=250_000)}
    )
    with TestClient(create_app(settings, torch.device("cpu")), raise_server_exceptions=False) as test_client:
        yield test_client


class Fuzzer:
    """Seeded random requests; each call returns (method, url, httpx keyword arguments)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self) -> str:
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:
            return f"p{r.randrange(PRODUCTS + 3)}"  # mostly real ids, a few unknown
        if kind == 1:
            return "".join(r.choices(string.printable, k=r.randrange(1, 40)))
        if kind == 2:  # any Unicode but surrogates: CJK, emoji, RTL, combining marks, controls
            return "".join(
                chr(r.choice([r.randrange(1, 0xD800), r.randrange(0xE000, 0x110000)])) for _ in range(8)
            )
        if kind == 3:
            return r.choice(
                ["../../etc/passwd", "..%2f..%2fetc%2fpasswd", "/etc/passwd", "a/b", "./", "..", "\\..\\"]
            )
        if kind == 4:
            return "x" * r.choice([256, 257, 4096, 20_000])
        if kind == 5:
            return r.choice(["", " ", "\x00", "%00", "' OR 1=1 --", "{}", "[]", "null", "true", "$where"])
        return self.number()

    def number(self) -> str:
        r = self.rng
        return r.choice(
            [
                str(r.randint(-5, 1005)),
                str(r.uniform(-1e6, 1e6)),
                "nan",
                "NaN",
                "inf",
                "-inf",
                "1e309",
                "-0",
                "0x10",
                "١٢٣",  # Arabic-Indic digits
                str(2**64),
                "",
                "1_000",
            ]
        )

    def params(self) -> dict[str, Any]:
        r = self.rng
        names = ["k", "category", "colour", "price_min", "price_max", "colour_weight", "limit", "after", "zz"]
        names += ["where", "in_stock"]
        params: dict[str, Any] = {}
        for name in r.sample(names, r.randrange(len(names))):
            if name in {"category", "colour"}:
                params[name] = [self.text() for _ in range(r.randrange(1, 4))]
            elif name == "where":
                params[name] = [self.where() for _ in range(r.randrange(1, 4))]
            elif name == "after":
                params[name] = r.choice([self.text(), "6f1c2a56-3d7e-5b8a-9c41-2e0f7d8b9a10"])
            else:
                params[name] = r.choice([self.number(), self.text()])
        return params

    def where(self) -> str:
        """A `where` condition: on a field products have or not, hidden or shown; a value, a range,
        a boolean or a number; or no condition at all."""
        r = self.rng
        field = r.choice(["category", "colour", "price", "title", "image", "content_hash", "nope", "", " "])
        value = r.choice(
            [self.text(), self.number(), "true", f"{self.number()}..{self.number()}", "..", "1.."]
        )
        return r.choice([f"{field}={value}", f"{field}{value}", value, "=" * r.randrange(3)])

    def upload(self) -> dict[str, Any]:
        r = self.rng
        png = io.BytesIO()
        Image.new("RGB", (r.randint(1, 64), r.randint(1, 64)), "red").save(png, "PNG")
        body = r.choice(
            [
                png.getvalue(),
                png.getvalue()[: r.randrange(1, len(png.getvalue()))],  # truncated
                r.randbytes(r.randrange(0, 3000)),
                b"",
                png_header(100_000, 100_000),  # a decompression bomb's header
                png_header(600, 600),  # declares more pixels than max_upload_pixels
                r.randbytes(250_000),  # over max_upload_bytes
            ]
        )
        kind = r.randrange(6)
        if kind == 0:
            return {
                "content": body,
                "headers": {"content-type": r.choice(["image/png", "application/json", ""])},
            }
        if kind == 1:
            return {"files": {r.choice(["file", "img", "image "]): ("x.png", body, "image/png")}}
        if kind == 2:  # a multipart header whose boundary does not match the body
            return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=zzz"}}
        name = r.choice(["x.png", "../../etc/passwd", "", "a" * 300, "x.exe"])
        return {"files": {"image": (name, body, r.choice(["image/png", "text/plain", "image/gif", ""]))}}

    def recommend_body(self) -> dict[str, Any]:
        r = self.rng
        body: dict[str, Any] = {
            "positive": [self.text() for _ in range(r.choice([0, 1, 2, 101]))],
            "negative": [self.text() for _ in range(r.randrange(3))],
        }
        for name in r.sample(
            ["k", "category", "colour", "price_min", "price_max", "where", "zz"], r.randrange(5)
        ):
            body[name] = r.choice([self.number(), self.text(), None, [], {}, 10**30, [self.where()]])
        kind = r.randrange(5)
        if kind == 0:  # NaN and Infinity as bare JSON tokens, which Python's json accepts
            raw = json.dumps(body).replace('"nan"', "NaN").replace('"inf"', "Infinity")
            return {"content": raw, "headers": {"content-type": "application/json"}}
        if kind == 1:
            return {"content": r.randbytes(r.randrange(100)), "headers": {"content-type": "application/json"}}
        if kind == 2:
            return {"json": r.choice([[], "x", 3, None, {"positive": "p1"}])}
        return {"json": body}

    def request(self) -> tuple[str, str, dict[str, Any]]:
        r = self.rng
        product = quote(self.text(), safe=r.choice(["", "/"]))
        kind = r.randrange(12)
        if kind <= 2:
            return "GET", f"/products/{product}/similar", {"params": self.params()}
        if kind == 3:
            return "GET", f"/products/{product}", {}
        if kind == 4:
            return "GET", f"/products/{product}/image", {}
        if kind == 5:
            return "GET", "/products", {"params": self.params()}
        if kind == 6:
            return "POST", "/search/image", {"params": self.params(), **self.upload()}
        if kind == 7:
            return "POST", "/recommend", self.recommend_body()
        if kind == 8:
            path = r.choice(["/healthz", "/readyz", "/", "/metrics", "/openapi.json", "/docs", "/redoc"])
            return "GET", path, {"params": self.params()}
        if kind == 9:  # wrong methods, unknown paths
            method = r.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"])
            return method, r.choice(["/products", f"/products/{product}", "/healthz", f"/{product}"]), {}
        if kind == 10:  # lying or garbage headers
            value = r.choice(["abc", "-1", "99999999999999999999", "1e3", " 12 ", ""])
            return "GET", f"/products/{product}/similar", {"headers": {"content-length": value}}
        return "POST", "/search/image", {"params": self.params(), **self.upload()}


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG declaring width x height pixels."""
    image = io.BytesIO()
    Image.new("1", (8, 8)).save(image, "PNG")
    data = bytearray(image.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return bytes(data)


def test_fuzzed_requests_never_get_a_5xx(client: TestClient) -> None:
    """Fault: VISREC_FAULTS_FUZZ_REQUESTS seeded random requests (500 by default) across every route:
    random ids (Unicode, very long, path-like), filter values (bad numbers, inverted ranges, NaN, inf,
    huge and negative k, `where` conditions on any field), query strings (unknown parameters too), JSON
    bodies, uploads (random bytes, truncated PNG, a bomb's header, over the size and pixel limits, wrong
    content types), lying Content-Length headers.
    visrec: validation answers 4xx (404 unknown product, 405, 413 too large, 422 malformed, unknown
    parameters, or a filter no product meets).
    Checked: no 5xx at all, and /healthz and /readyz still answer 200 afterwards."""
    fuzzer = Fuzzer(random.Random(SEED))
    statuses: Counter[int] = Counter()
    failures: list[tuple[int, str, str, str]] = []
    for _ in range(REQUESTS):
        method, url, kwargs = fuzzer.request()
        response = client.request(method, url, **kwargs)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append((response.status_code, method, url[:120], response.text[:200]))
    figure("fuzz", {"requests": REQUESTS, "seed": SEED, "statuses": dict(sorted(statuses.items()))})
    assert not failures, failures[:10]
    assert all(200 <= status < 500 for status in statuses)
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["points"] == PRODUCTS
