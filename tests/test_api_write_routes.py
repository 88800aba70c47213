"""The write routes' contract through FastAPI's test client (the real app and guard, a real embedded store
and model): JSON-lines batches split only where a row ends, wrong write keys throttled whichever keys are
configured, one product per path on every method with truthful `Allow` headers, and PATCH refusing
exactly what its schema refuses. The same routes over real HTTP: tests/faults/test_api_writes.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import jsonschema_rs
import pytest
import torch
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr
from starlette.routing import Match

from tests.helpers import MakeCatalogue, run_sync
from visrec.api import create_app
from visrec.api.writes import json_lines
from visrec.config import ApiSettings, Settings
from visrec.guard import routing_path

WRITE, READ = "write-key-9", "read-key-9"
EXAMPLES = int(os.environ.get("VISREC_WRITE_ROUTE_EXAMPLES", "60"))
SLOW = hypothesis_settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# What str.splitlines splits at besides LF and CR, all but the controls legal unescaped in a JSON string.
LINE_BREAKS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"


def app_client(settings: Settings, **api: Any) -> TestClient:
    return TestClient(
        create_app(settings.model_copy(update={"api": ApiSettings(**api)}), torch.device("cpu"))
    )


@pytest.fixture
def synced(make_catalogue: MakeCatalogue, settings: Settings) -> Settings:
    run_sync(make_catalogue(3), settings)  # p0, p1, p2
    return settings


@pytest.fixture
def writer(settings: Settings) -> Iterator[TestClient]:
    """An app with a write key and no read key, on an empty store (rows without photos touch nothing)."""
    with app_client(settings, write_key=SecretStr(WRITE)) as client:
        client.headers["X-API-Key"] = WRITE
        yield client


# --- 1. JSON lines ----------------------------------------------------------------------------------------

TEXT = st.text(max_size=12) | st.text(st.sampled_from(LINE_BREAKS + '\r\n a"\\'), max_size=8)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# A row: mostly an object with an id (never a photo: nothing is fetched or embedded), sometimes anything.
ROW = (
    st.dictionaries(TEXT.filter(lambda key: key not in ("image", "images")), JSON, max_size=4).flatmap(
        lambda fields: st.builds(lambda i: {"id": i, **fields} if i is not None else fields, st.none() | TEXT)
    )
    | JSON
)


def batch_lines(client: TestClient, body: str) -> list[dict[str, Any]]:
    answer = client.post(
        "/products/batch", content=body.encode(), headers={"content-type": "application/x-ndjson"}
    )
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


def test_the_reviews_three_rows_get_three_answers(writer: TestClient) -> None:
    rows = [{"id": "a", "title": "x\u2028y"}, {"id": "b", "title": "p\u2029q\u0085r"}, {"id": "c"}]
    body = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n"
    results = batch_lines(writer, body)
    assert [r["product_id"] for r in results] == ["a", "b", "c"], results
    assert all(r["outcome"].startswith("error: ") and "photo" in r["outcome"] for r in results), results


@SLOW
@given(
    rows=st.lists(ROW, min_size=1, max_size=6), newline=st.sampled_from(["\n", "\r\n"]), last=st.booleans()
)
def test_json_lines_answer_each_row_in_order(
    writer: TestClient, rows: list[Any], newline: str, last: bool
) -> None:
    """Any JSON rows, their strings of any text (line and paragraph separators, NEL, controls), one per
    line without escaping what JSON need not escape: one answer per row, in the rows' order."""
    body = newline.join(json.dumps(row, ensure_ascii=False) for row in rows) + (newline if last else "")
    assert len(json_lines(body)) == len(rows)
    results = batch_lines(writer, body)
    assert [r["product_id"] for r in results] == [
        str(row["id"]) if isinstance(row, dict) and row.get("id") is not None else "" for row in rows
    ], results
    assert all(r["outcome"].startswith("error: ") for r in results)


# --- 2. wrong write keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("read_key", "refused"), [(None, 403), (READ, 401)])
def test_wrong_write_keys_are_throttled_whichever_keys_are_set(
    synced: Settings, read_key: str | None, refused: int
) -> None:
    """Guessing the write key, a new guess each time, from one client: `auth_failure_burst` refusals, then
    429 with Retry-After — with a read key set (401: no key of this service) and without one (403: the
    write routes' answer; every guess used to be a 403, never throttled). The write key still writes; the
    read key is no guess (403, no token); reads with no read key set are not limited."""
    api: dict[str, Any] = {"write_key": SecretStr(WRITE), "auth_failure_per_s": 0.5, "auth_failure_burst": 4}
    if read_key:
        api["api_key"] = SecretStr(read_key)
    with app_client(synced, **api) as client:
        if read_key:
            for _ in range(6):
                assert client.delete("/products/p1", headers={"X-API-Key": READ}).status_code == 403
        guesses = [
            client.request(method, path, headers={"X-API-Key": f"guess-{i}"}).status_code
            for i, (method, path) in enumerate(
                [("PUT", "/products/a"), ("POST", "/products/batch")] * 3 + [("PATCH", "/products/a%2Fb")]
            )
        ]
        assert guesses == [refused] * 4 + [429] * 3, guesses
        limited = client.delete("/products/p1")  # no key at all: a failed authentication too
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert "failed authentications" in limited.json()["detail"]
        right = client.delete("/products/p1", headers={"X-API-Key": WRITE})
        assert right.status_code == 200 and right.json()["outcome"] == "deleted"
        if read_key is None:
            assert client.get("/products/p2").status_code == 200  # reads need no key: not limited
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("read_key", "refused"), [(None, 403), (READ, 401)])
def test_no_write_key_header_writes_nothing(synced: Settings, read_key: str | None, refused: int) -> None:
    """A service with a write key: a write with no X-API-Key header at all is refused like a wrong key —
    403 from the write routes with no read key set, 401 from the guard with one — and writes nothing."""
    api: dict[str, Any] = {"write_key": SecretStr(WRITE), "auth_failure_burst": 100}
    if read_key:
        api["api_key"] = SecretStr(read_key)
    reader = {"X-API-Key": read_key} if read_key else {}
    with app_client(synced, **api) as client:
        before = {p: client.get(f"/products/{p}", headers=reader).json() for p in ("p0", "p1", "p2")}
        row = {"image": "http://192.0.2.1/x.jpg", "title": "anonymous"}  # valid; its photo never fetched
        anonymous = [
            client.patch("/products/p1", json={"title": "anonymous"}),
            client.put("/products/p2", json=row),
            client.put("/products/new1", json=row),
            client.delete("/products/p0"),
            client.post("/products/batch", json=[{"id": "new1", **row}, {"id": "p1", **row}]),
        ]
        assert [r.status_code for r in anonymous] == [refused] * 5, [r.text for r in anonymous]
        after = {p: client.get(f"/products/{p}", headers=reader).json() for p in ("p0", "p1", "p2")}
        assert after == before
        assert client.get("/products/new1", headers=reader).status_code == 404
        written = client.patch("/products/p1", json={"title": "keyed"}, headers={"X-API-Key": WRITE})
        assert written.status_code == 200  # the same write with the key goes through
        assert client.get("/products/p1", headers=reader).json()["payload"]["title"] == "keyed"


# --- 3. one product per path, on every method -------------------------------------------------------------

METHODS = ("GET", "PUT", "PATCH", "DELETE", "POST")
WRITES = ("PUT", "PATCH", "DELETE")
SUFFIXES = ("similar", "image", "images/0", "images/x")
ID_PART = st.sampled_from([*"ab/%.-_ ?#&ü\n", "similar", "image", "images", "batch", "%2F"])
IDS = st.lists(ID_PART, min_size=1, max_size=6).map("".join)


def encoded(product_id: str, keep_slashes: bool = False) -> str:
    """The id as path segments: one (every '/' as %2F), or one per '/'-separated part (a segment '.' or
    '..' as %2E: a client would resolve it)."""
    parts = product_id.split("/") if keep_slashes else [product_id]
    return "/".join(quote(part, safe="").replace(".", "%2E") for part in parts)


def resolve(app: Any, method: str, path: str) -> tuple[str, str | None] | None:
    """The route template and the product id (decoded, as `deps.ProductId` does) that the app's router
    picks for `method` at `path` as sent, the guard's routing path; None where no route takes it."""
    scope = {
        "type": "http",
        "method": method,
        "path": unquote(path),
        "raw_path": path.encode(),
        "root_path": "",
    }
    scope["path"] = routing_path(scope)
    for route in iter_route_contexts(app.routes):  # the router's order, included routers' routes too
        match, child = route.matches(scope)
        if match is Match.FULL:
            found = child.get("path_params", {}).get("product_id")
            return str(route.path), None if found is None else unquote(found)
    return None


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, TestClient]]:
    """The app (never started: routing and the 405 answer need no model or store)."""
    from tests.helpers import small_settings

    root = tmp_path_factory.mktemp("routes")
    app = create_app(small_settings(root), torch.device("cpu"))
    yield app, TestClient(app)


@hypothesis_settings(max_examples=EXAMPLES * 5, deadline=None)
@given(product_id=IDS, plain=st.booleans(), suffix=st.none() | st.sampled_from(SUFFIXES))
@example(product_id="/images", plain=True, suffix="similar")  # GET took it as photo "similar" of ""
def test_a_path_names_one_product_on_every_method(
    routed: tuple[Any, TestClient], product_id: str, plain: bool, suffix: str | None
) -> None:
    """Any id, sent as one segment (%2F for '/') or with its '/' plain, with or without a read route's
    suffix: every method that takes the path takes it as the same product; a path with a suffix is a read
    route's on every method (never a write of "x/similar"); an encoded id is its product on every method;
    POST takes only /products/batch and a product's /similar (its body form); and a 405's `Allow` lists
    exactly the methods that take the path."""
    app, client = routed
    path = "/products/" + encoded(product_id, plain) + (f"/{suffix}" if suffix else "")
    taken = {method: resolve(app, method, path) for method in METHODS}
    products = {found[1] for m, found in taken.items() if found is not None and m != "GET"} - {None}
    get = taken["GET"]
    assert get is not None
    if get[0] == "/products/{product_id:path}":  # the product, on every method
        assert all(taken[m] is not None for m in WRITES) and products == {get[1]}, taken
        if not plain and not suffix:
            assert get[1] == product_id
    else:  # a read route's suffix: GET only
        assert suffix or plain, taken
        assert all(taken[m] is None for m in WRITES), taken
    similar_post = taken["POST"] is not None and taken["POST"][0] == "/products/{product_id:path}/similar"
    assert (taken["POST"] is not None) == (path == "/products/batch" or similar_post), taken
    assert not similar_post or taken["GET"] == taken["POST"], taken
    answer = client.options(path)
    assert answer.status_code == 405 and answer.json()["request_id"]
    allow = set(answer.headers["allow"].split(", "))
    assert allow == {m for m in METHODS if taken[m] is not None}, (path, taken, allow)


def test_the_reviews_paths(routed: tuple[Any, TestClient]) -> None:
    app, client = routed
    assert resolve(app, "PUT", "/products/x/similar") is None
    assert resolve(app, "PUT", "/products/x%2Fsimilar") == ("/products/{product_id:product}", "x/similar")
    assert resolve(app, "DELETE", "/products/batch") == ("/products/{product_id:product}", "batch")
    refused = client.put("/products/x/similar", json={})
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"  # POST: the body form
    assert client.options("/products/batch").headers["allow"] == "DELETE, GET, PATCH, POST, PUT"
    assert client.options("/products/a/images/3").headers["allow"] == "GET"
    # A line feed in an id: the product's on every route (it was a 404; `…/similar%0A` was similar-to x).
    assert resolve(app, "GET", "/products/a%0Ab") == ("/products/{product_id:path}", "a\nb")
    assert resolve(app, "GET", "/products/x/similar%0A") == ("/products/{product_id:path}", "x/similar\n")


# --- 4. PATCH refuses what its schema refuses -------------------------------------------------------------

KEYS = st.sampled_from(
    ["category", "colour", "price", "title", "brand", "tags", "id", "image", "images", "content_hash"]
    + ["model_version", " ", "\t", "\x1c", "\u3000", "\ufeff", " a", "a b"]
) | st.text(max_size=4)
LEAF = (
    st.none()
    | st.booleans()
    | st.text(max_size=6)
    | st.integers()
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**70, float(2**63), -float(2**63), 1e300])
    | st.floats(allow_nan=False, allow_infinity=False)
)
VALUE = LEAF | st.lists(LEAF, max_size=3) | st.lists(st.lists(LEAF, max_size=2) | st.dictionaries(KEYS, LEAF))
BODY = st.dictionaries(KEYS, VALUE | st.dictionaries(KEYS, VALUE, max_size=2), max_size=4) | st.lists(LEAF)


@pytest.fixture
def patcher(synced: Settings) -> Iterator[tuple[TestClient, Any]]:
    """A write client and the schema's validator (the one Schemathesis uses) for PATCH's body."""
    with app_client(synced, write_key=SecretStr(WRITE)) as client:
        client.headers["X-API-Key"] = WRITE
        schema = client.get("/openapi.json").json()["components"]["schemas"]["ProductPatch"]
        yield client, jsonschema_rs.validator_for(schema)


def test_a_fields_name_is_more_than_what_strip_drops() -> None:
    from visrec.values import WHITESPACE

    assert set(WHITESPACE) == {chr(c) for c in range(0x110000) if chr(c).isspace()}


def test_patch_refuses_nested_values_with_a_clear_message(patcher: tuple[TestClient, Any]) -> None:
    client, _ = patcher
    for body in ({"specs": {"a": 1}}, {"tags": [{"a": 1}]}, {"tags": [[1]]}, {"n": 2**64}):
        refused = client.patch("/products/p1", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert "a list of those" in refused.text or "64 bits" in refused.text, refused.text
    assert client.patch("/products/p1", json={"tags": ["a", 1, None], "on": True}).status_code == 200
    assert "specs" not in client.get("/products/p1").json()["payload"]


@SLOW
@given(body=BODY)
def test_patch_accepts_exactly_what_its_schema_allows(patcher: tuple[TestClient, Any], body: Any) -> None:
    """Generated PATCH bodies (typed fields of every type, nested objects and lists, numbers at and past
    64 bits, names of white space, the id, photos and computed fields): valid by the OpenAPI schema, as
    JSON Schema reads it, is 200 or refused for a documented reason; invalid is 422. The documented
    reasons: a whole number beyond 64 bits that the validator, comparing the schema's bounds (doubles)
    lossily, let through; a lone surrogate escape (not generated)."""
    client, validator = patcher
    text = json.dumps(body)
    valid = validator.is_valid(json.loads(text))
    answer = client.patch("/products/p1", content=text, headers={"content-type": "application/json"})
    if valid and answer.status_code == 422:
        assert "beyond 64 bits" in answer.text and beyond_64_bits(body), (body, answer.text)
        return
    assert answer.status_code == (200 if valid else 422), (valid, body, answer.text)


def beyond_64_bits(value: Any) -> bool:
    if isinstance(value, dict):
        return any(map(beyond_64_bits, value.values()))
    if isinstance(value, list):
        return any(map(beyond_64_bits, value))
    return isinstance(value, int | float) and not isinstance(value, bool) and not -(2**63) <= value < 2**63


def test_writes_of_needs_the_write_key_itself() -> None:
    """The write routes' own check (`writes_of`), whatever the guard let through: the write key, whole
    and as bytes, or 403; none configured: writes are off."""
    from types import SimpleNamespace

    from fastapi import Request

    from visrec.api.writes import writes_of
    from visrec.errors import WriteForbidden

    writes = object()

    def request(write_key: str | None, sent: bytes | None) -> Request:
        api = SimpleNamespace(write_key=None if write_key is None else SecretStr(write_key))
        service = SimpleNamespace(settings=SimpleNamespace(api=api))
        app = SimpleNamespace(state=SimpleNamespace(service=service, writes=writes))
        headers = [] if sent is None else [(b"x-api-key", sent)]
        return Request({"type": "http", "headers": headers, "app": app})

    assert writes_of(request(WRITE, WRITE.encode())) is writes
    for sent in (None, b"", b"wrong", WRITE.encode() + b"x", WRITE.encode()[:-1]):
        with pytest.raises(WriteForbidden, match=r"^this route needs the write key in X-API-Key$"):
            writes_of(request(WRITE, sent))
    with pytest.raises(WriteForbidden):  # no header is no key, not some stand-in value
        writes_of(request("XXXX", None))
    for sent in (None, b"", b"anything"):
        with pytest.raises(
            WriteForbidden, match=r"^writes are off on this service: it has no VISREC_API__WRITE_KEY$"
        ):
            writes_of(request(None, sent))


# --- the answer rule: PUT and a batch row give the same reason, naming no URL and no path ---------------

REFUSED_PHOTO = st.sampled_from(
    [
        "/etc/passwd",
        "images/p1.png",
        "C:\\photos\\a.png",
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.png",
        "http://10.0.0.1/secret/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://user:pw@127.0.0.1/a.png",
        "http://127.0.0.1:9/private/a.png",  # loopback: not an allowed host here
    ]
)
ROW_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "price": st.sampled_from([1.5, "abc", "€25", "19,99", "25 EUR", -1, True, False, 0]),
        "category": st.sampled_from(["shirt", "", "  "]),
        "title": st.text(max_size=5),
    },
)
_A_URL_OR_PATH = ("://", "/etc/", "/private/", "/secret/", "\\photos\\", "images/p1")


@SLOW
@given(photos=st.lists(REFUSED_PHOTO, min_size=1, max_size=3), fields=ROW_FIELDS, many=st.booleans())
def test_put_and_a_batch_row_give_the_same_reason(
    writer: TestClient, photos: list[str], fields: dict[str, Any], many: bool
) -> None:
    row = {**fields, **({"images": photos} if many else {"image": photos[0]})}
    put = writer.put("/products/r1", json=row)
    [answered] = writer.post("/products/batch", json=[{**row, "id": "r1"}]).json()["results"]
    assert put.status_code == 422 and answered["outcome"].startswith("error: "), (put.text, answered)
    reason = answered["outcome"].removeprefix("error: ")
    assert put.json()["detail"] == reason
    assert not any(part in reason for part in _A_URL_OR_PATH), reason
    plain_path = photos[0] in ("/etc/passwd", "images/p1.png", "C:\\photos\\a.png") and not many
    if plain_path and fields.get("price", 1.5) == 1.5:
        assert "photos must be http(s) URLs over HTTP" in reason


def test_a_patch_says_why_a_value_is_refused_as_a_put_and_a_row_would(
    patcher: tuple[TestClient, Any],
) -> None:
    """The same mistake, the same reason and error kind, on PATCH, PUT and a batch row (outside trial)."""
    client, _ = patcher
    fields = [{"price": v} for v in ("abc", "€", -1, "19,99", "€ 19,99", "25 EUR", "5", True)]
    fields += [{"colours": "red"}, {"content_hash": "x"}]
    for body in fields:
        patched = client.patch("/products/p1", json=body)
        put = client.put("/products/p9", json={"image": "https://cdn.example.com/a.png", **body})
        [row] = client.post(
            "/products/batch", json=[{"id": "p9", "image": "https://cdn.example.com/a.png", **body}]
        ).json()["results"]
        assert patched.status_code == put.status_code == 422, (patched.text, put.text)
        said = {patched.json()["detail"], put.json()["detail"], row["outcome"].removeprefix("error: ")}
        assert len(said) == 1, said
        assert patched.json()["error"] == put.json()["error"] == "InvalidQuery"
