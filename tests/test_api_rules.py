"""The shop's rules (exclude, boost, decay) and the caching headers over HTTP: FastAPI's test client on
the real app, guard, embedded store and model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr
from typer.testing import CliRunner

from tests.helpers import COLOURS, SHAPES, draw_product, run_sync, small_settings, write_csv
from visrec import query
from visrec.api import create_app
from visrec.artefact import Manifest
from visrec.cli import app as cli
from visrec.config import ApiSettings, QdrantSettings, Settings
from visrec.index import IndexPoint, open_store
from visrec.rules import MAX_EXCLUDE

WRITE, READ = "write-key-7", "read-key-7"
TODAY = datetime.now(UTC).date()


def write_stock(root: Path, n: int = 18) -> Path:
    """A catalogue of drawn products with `in_stock` (CSV text) and an arrival date, `added`."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
        draw_product(root / "images" / f"p{i}.png", shape, colour, variant=i)
        added = (TODAY - timedelta(days=7 * i)).isoformat()
        rows.append({"id": f"p{i}", "image": f"images/p{i}.png", "category": shape, "colour": colour})
        rows[-1] |= {"price": f"{10 + i}.5", "in_stock": str(i % 2 == 0).lower(), "added": added}
    return write_csv(root / "stock.csv", rows)


def app_client(settings: Settings, **api: Any) -> TestClient:
    return TestClient(
        create_app(settings.model_copy(update={"api": ApiSettings(**api)}), torch.device("cpu"))
    )


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]) -> Settings:
    root = tmp_path_factory.mktemp("stock")
    settings = small_settings(root, artefact=artefact[0])
    run_sync(write_stock(root), settings)
    return settings


@pytest.fixture
def fresh(tmp_path: Path, artefact: tuple[Path, Manifest]) -> Settings:
    """A store of its own, for a test that runs its own service (one service a store)."""
    settings = small_settings(tmp_path, artefact=artefact[0])
    run_sync(write_stock(tmp_path, 9), settings)
    return settings


@pytest.fixture(scope="module")
def client(stocked: Settings) -> Iterator[TestClient]:
    """A service that only reads (a test that writes makes its own)."""
    with app_client(stocked) as test_client:
        yield test_client


def test_exclude_boost_and_decay_over_http(client: TestClient) -> None:
    plain = client.get("/products/p4/similar", params={"k": 6}).json()["results"]
    assert all(hit["score"] == hit["distance"] for hit in plain)
    gone = [plain[0]["product_id"], plain[2]["product_id"]]
    params: dict[str, Any] = {"k": 6, "exclude": gone, "boost": "in_stock=100", "decay": "added=30d"}
    ruled = client.get("/products/p4/similar", params=params).json()["results"]
    assert len(ruled) == 6 and not {hit["product_id"] for hit in ruled} & set(gone)
    stock = [hit["payload"]["in_stock"] for hit in ruled]
    assert stock == sorted(stock, key=lambda s: s != "true")  # every in-stock one first
    assert [hit["score"] for hit in ruled] == sorted(hit["score"] for hit in ruled)
    # The body form takes a list longer than a URL holds, and answers alike.
    body = {"k": 6, "exclude": [*gone, *(f"seen-{i}" for i in range(300))], "boost": ["in_stock=100"]}
    body |= {"decay": ["added=30d"]}
    posted = client.post("/products/p4/similar", json=body)
    assert posted.status_code == 200 and posted.json()["results"] == ruled
    # And the recommend body.
    recommended = client.post("/recommend", json={"positive": ["p4"], "exclude": gone, "k": 5}).json()
    assert not {hit["product_id"] for hit in recommended["results"]} & {*gone, "p4"}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"boost": "in_stock=nan"}, "boost"),
        ({"boost": "in_stock=1e400"}, "boost"),
        ({"boost": "in_stock"}, "boost"),
        ({"boost": "in_stok=1"}, "cannot boost by in_stok"),
        ({"decay": "added=soon"}, "decay"),
        ({"decay": "price=30d"}, "cannot decay by price"),
        ({"exclude": [f"x{i}" for i in range(MAX_EXCLUDE + 1)]}, "exclude"),
    ],
)
def test_bad_rules_are_422s_naming_the_parameter(
    client: TestClient, params: dict[str, Any], named: str
) -> None:
    if "exclude" in params:  # past what a URL holds: the body form
        response = client.post("/products/p4/similar", json=params)
    else:
        response = client.get("/products/p4/similar", params=params)
    assert response.status_code == 422 and named in response.json()["detail"]


@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.text(max_size=24), kind=st.sampled_from(["boost", "decay"]))
def test_any_rule_text_is_answered_never_a_500(client: TestClient, value: str, kind: str) -> None:
    response = client.get("/products/p4/similar", params={kind: value, "k": 3})
    assert response.status_code in (200, 422)
    if response.status_code == 422:
        assert kind in response.json()["detail"] or "cannot" in response.json()["detail"]


def test_the_schema_shows_the_rules(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    get = schema["paths"]["/products/{product_id}/similar"]["get"]
    names = {p["name"] for p in get["parameters"]}
    assert {"exclude", "boost", "decay"} <= names and "304" in get["responses"]
    body = schema["components"]["schemas"]["SimilarRequest"]["properties"]
    assert {"exclude", "boost", "decay", "k"} <= set(body)
    assert {"exclude", "boost", "decay"} <= set(
        schema["components"]["schemas"]["RecommendRequest"]["properties"]
    )


def test_the_same_request_twice_is_a_304_that_runs_no_search(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, params = "/products/p4/similar", {"k": 4, "boost": "in_stock=1"}
    first = client.get(url, params=params)
    tag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache" and "Vary" not in first.headers

    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("a 304 searched")

    monkeypatch.setattr(query, "similar_to_product", no_search)
    again = client.get(url, params=params, headers={"If-None-Match": f'W/"other", {tag}'})
    assert again.status_code == 304 and again.headers["ETag"] == tag and not again.content
    monkeypatch.undo()
    assert client.get(url, params={**params, "k": 5}, headers={"If-None-Match": tag}).status_code == 200
    for path in ("/products/p4", "/products"):
        tagged = client.get(path).headers["ETag"]
        assert client.get(path, headers={"If-None-Match": tagged}).status_code == 304
    # `*` validates nothing: the answer may not exist (the outside review: a deleted product was a 304).
    star = {"If-None-Match": "*"}
    assert client.get(url, params=params, headers=star).status_code == 200
    assert client.get("/products/no-such/similar", headers=star).status_code == 404
    assert client.get(url, params={"boost": "unknown=1"}, headers=star).status_code == 422


def test_a_decayed_answer_is_tagged_by_its_time_bucket(client: TestClient) -> None:
    """A decay over 1 s ticks every 10 ms: the tag changes with the bucket its ages count from."""
    params = {"k": 3, "decay": "added=1s"}
    tags = set()
    for _ in range(3):
        tags.add(client.get("/products/p4/similar", params=params).headers["ETag"])
        time.sleep(0.02)
    assert len(tags) == 3


def test_a_write_changes_the_tag_and_another_key_never_gets_a_304(fresh: Settings) -> None:
    api = {"api_key": SecretStr(READ), "write_key": SecretStr(WRITE)}
    with app_client(fresh, **api) as client:
        read, write = {"X-API-Key": READ}, {"X-API-Key": WRITE}
        first = client.get("/products/p4/similar", headers=read)
        tag = first.headers["ETag"]
        assert first.headers["Vary"] == "X-API-Key" and first.headers["Cache-Control"] == "private, no-cache"
        assert client.get("/products/p4/similar", headers={**read, "If-None-Match": tag}).status_code == 304
        other = client.get("/products/p4/similar", headers={**write, "If-None-Match": tag})
        assert other.status_code == 200 and other.headers["ETag"] != tag
        patched = client.patch("/products/p8", json={"title": "renamed"}, headers=write)
        assert patched.status_code == 200
        after = client.get("/products/p4/similar", headers={**read, "If-None-Match": tag})
        assert after.status_code == 200 and after.headers["ETag"] != tag
    shared = {**api, "cache_holds_key": True, "cache_control": "max-age=60"}
    with app_client(fresh, **shared) as client:
        answer = client.get("/products/p4", headers={"X-API-Key": READ})
        assert answer.headers["Cache-Control"] == "max-age=60" and answer.headers["Vary"] == "X-API-Key"


def test_a_reindex_switch_changes_the_tag(
    fresh: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`visrec reindex`, handed to the running service, switches versions: the tag changes."""
    for name, value in {
        "VISREC_ARTEFACT": str(fresh.artefact),
        "VISREC_QDRANT__PATH": str(fresh.qdrant.path),
        "VISREC_EMBED__WORKERS": "0",
        "VISREC_EMBED__DEVICE": "cpu",
        "VISREC_INGEST__FAILURE_REPORT": str(tmp_path / "failures.jsonl"),
    }.items():
        monkeypatch.setenv(name, value)
    with app_client(fresh, alias_check_s=0) as client:
        tag = client.get("/products/p4/similar").headers["ETag"]
        catalogue = tmp_path / "stock.csv"
        done = CliRunner().invoke(cli, ["reindex", str(catalogue), "--model", str(fresh.artefact), "--force"])
        assert done.exit_code == 0, done.output
        after = client.get("/products/p4/similar", headers={"If-None-Match": tag})
        assert after.status_code == 200 and after.headers["ETag"] != tag


def test_a_server_collection_keeps_its_write_stamp(tmp_path: Path) -> None:
    """On a server, another handle's (another process's) write changes every handle's state: the stamp
    is in the collection, not in the handle that wrote."""
    with open_store(QdrantSettings(url=":memory:", path=tmp_path, collection="c")) as store:
        writer = store.open("c__v1")
        writer.create(4)
        reader = store.open("c__v1")
        before = reader.state()
        writer.upsert([IndexPoint("a", np.ones((1, 4), dtype=np.float32), {"product_id": "a"})])
        assert reader.state() != before
        after = reader.state()
        writer.overwrite_payloads({"a": {"product_id": "a", "in_stock": True}})
        assert reader.state() != after and "visrec_written" not in reader.metadata()
