"""A revalidation answered before routing (`caching.Revalidation`): for any request, the early answer is
the one the route would give. FastAPI's test client on the real app, guard, embedded store and model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tests.helpers import run_sync, small_settings
from tests.test_api_rules import app_client, write_stock
from visrec import query
from visrec.api.caching import Revalidation
from visrec.artefact import Manifest
from visrec.config import Settings

READ, WRITE = "read-key-9", "write-key-9"
KEYS = {"none": {}, "read": {"X-API-Key": READ}, "write": {"X-API-Key": WRITE}, "wrong": {"X-API-Key": "x"}}
PATHS = [
    "/products",
    "/products/p4/similar",
    "/products/p4/similar",
    "/products/p4",
    "/products/p4/similar",
    "/products/p5/similar",
    "/products/nope/similar",
    "/products/nope",
    "/products/p4/image",
    "/products/p4%2Fx/similar",
    "/healthz",
]
# Parameters valid on some routes, refused on others, or refused everywhere (422s of every kind).
PARAMETERS = [
    ("k", "3"),
    ("k", "0"),
    ("k", "x"),
    ("limit", "2"),
    ("boost", "in_stock=1"),
    ("boost", "in_stock=-2.5"),
    ("boost", "unknown=1"),
    ("boost", "in_stock=1e9"),
    ("decay", "added=30d"),
    ("decay", "added=365d"),
    ("decay", "price=30d"),
    ("decay", "added=0d"),
    ("exclude", "p3"),
    ("category", "circle"),
    ("category", "nothing"),
    ("categroy", "circle"),
    ("diversity", "0.5"),
    ("max_per", "category=1"),
    ("colour_weight", "0.5"),
]


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]) -> Settings:
    root = tmp_path_factory.mktemp("revalidation")
    settings = small_settings(root, artefact=artefact[0])
    run_sync(write_stock(root, 9), settings)
    return settings


@pytest.fixture(scope="module")
def client(stocked: Settings) -> Iterator[TestClient]:
    """Both keys set, and failed authentications never throttled here (the early and the route's
    answers of one request are compared: a 429 between them would be the throttle's, not theirs)."""
    api = {"api_key": SecretStr(READ), "write_key": SecretStr(WRITE), "auth_failure_burst": 10**6}
    with app_client(stocked, **api) as test_client:
        yield test_client


def _layer(client: TestClient) -> Revalidation:
    """The app's revalidation layer (the middleware stack is built by the first request)."""
    layer: Any = client.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(layer, Revalidation):
        layer = layer.app
    return layer


def _answer(response: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    """What a client sees of an answer."""
    return response.status_code, dict(response.headers), response.content


@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(PATHS),
    params=st.lists(st.sampled_from(PARAMETERS), max_size=3),
    key=st.sampled_from(["read", "read", "write", "none", "wrong"]),  # mostly admitted
    tagged_with=st.sampled_from(["same", "same", "same", *KEYS]),  # mostly the request's own key
    form=st.sampled_from(["tag", "tag", "weak", "listed", "none", "other", "star", "garbage"]),
)
def test_an_early_answer_is_the_routes(
    client: TestClient,
    path: str,
    params: list[tuple[str, str]],
    key: str,
    tagged_with: str,
    form: str,
) -> None:
    """For any request (route, parameters, key, If-None-Match), the answer given with the tags a 200
    left in memory is the answer the route gives without them; and a 304 only where the same request
    was a 200 with the tag it names."""
    tagged_with = key if tagged_with == "same" else tagged_with
    own = client.get(path, params=params, headers=KEYS[tagged_with])  # a 200 leaves its tag
    other = client.get("/products/p4/similar", headers=KEYS[tagged_with])
    tag, other_tag = own.headers.get("ETag", '"none"'), other.headers.get("ETag", '"none"')
    named = {
        "none": None,
        "tag": tag,
        "weak": f"W/{tag}",
        "listed": f'"x", {other_tag}, {tag}',
        "other": other_tag,
        "star": "*",
        "garbage": '"abc", W/',
    }[form]
    # One request id for both: error bodies name it.
    headers = {**KEYS[key], "X-Request-ID": "r1", **({"If-None-Match": named} if named is not None else {})}
    plain = client.get(path, params=params, headers=KEYS[key])
    early = client.get(path, params=params, headers=headers)
    _layer(client).sent.clear()  # forgotten (as after a restart): the route answers
    routed = client.get(path, params=params, headers=headers)
    assert _answer(early) == _answer(routed)
    event(f"answered {early.status_code}")
    if early.status_code == 304:
        assert plain.status_code == 200 and named is not None and plain.headers["ETag"] in named


def test_an_early_304_skips_routing_but_not_the_guard(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early 304 runs no search and no FastAPI dependency, is counted under its route, and still
    needs the key; after a write the tag is new and the route answers."""
    url, params, read = "/products/p4/similar", {"k": 3, "decay": "added=30d"}, KEYS["read"]
    tag = client.get(url, params=params, headers=read).headers["ETag"]

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the route ran")

    monkeypatch.setattr(query, "similar_to_product", never)
    monkeypatch.setattr("visrec.api.deps.check_caps", never)
    again = client.get(url, params=params, headers={**read, "If-None-Match": tag})
    assert again.status_code == 304 and again.headers["ETag"] == tag
    assert again.headers["Vary"] == "X-API-Key" and again.headers["Cache-Control"] == "private, no-cache"
    assert client.get(url, params=params, headers={"If-None-Match": tag}).status_code == 401
    monkeypatch.undo()
    metrics = client.get("/metrics", headers=read).text
    assert 'route="/products/{product_id}/similar",status="304"' in metrics
    # HEAD is not served and a POST is not cached: they go to the route whatever they name.
    assert client.head(url, params=params, headers={**read, "If-None-Match": tag}).status_code == 405
    posted = client.post(url, json={"k": 3, "decay": ["added=30d"]}, headers={**read, "If-None-Match": tag})
    assert posted.status_code == 200


def test_a_rate_limit_still_holds(tmp_path: Path, artefact: tuple[Path, Manifest]) -> None:
    settings = small_settings(tmp_path, artefact=artefact[0])  # a store of its own: one service a store
    run_sync(write_stock(tmp_path, 3), settings)
    with app_client(settings, rate_limit_per_s=0.001, rate_limit_burst=2) as client:
        first = client.get("/products/p1")
        assert first.status_code == 200, first.text
        tag = first.headers["ETag"]
        assert client.get("/products/p1", headers={"If-None-Match": tag}).status_code == 304
        assert client.get("/products/p1", headers={"If-None-Match": tag}).status_code == 429
