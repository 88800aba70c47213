"""Ties at the k-th place: products sharing a photo (identical vectors, equal distances) are cut by
product id, the same in `similar` (the CLI, the HTTP API, `query`) and in the feed (`visrec neighbours`),
where the engine alone cuts arbitrarily among equal distances. Real embedded engine, real processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.faults.helpers import run_visrec
from tests.helpers import small_settings
from visrec import query
from visrec.api import create_app
from visrec.artefact import Manifest
from visrec.config import QdrantSettings
from visrec.feed_run import make_feed
from visrec.filters import Filters
from visrec.index import IndexPoint, VectorIndex, open_index
from visrec.neighbours import FeedRules, lists_for


def base(dim: int, m: int) -> np.ndarray:
    """Photo m: m along axis m (0: the origin). Any two are sqrt(a² + b²) apart: one photo's distances
    to the others all differ, and products sharing a photo tie exactly."""
    vector = np.zeros(dim, np.float32)
    if m:
        vector[m] = m
    return vector


def write_points(index: VectorIndex, photos: dict[str, int], dim: int, model: str) -> None:
    index.create(dim, {"model_version": model})
    index.upsert(
        [
            IndexPoint(p, base(dim, m)[None, :], {"product_id": p, "model_version": model})
            for p, m in photos.items()
        ]
    )


def expected(photos: dict[str, int], product: str, k: int, dim: int) -> list[str]:
    """The k nearest by (distance, product id), worked out here."""
    origin = base(dim, photos[product])
    by = sorted((float(np.linalg.norm(base(dim, m) - origin)), p) for p, m in photos.items() if p != product)
    return [p for _, p in by[:k]]


# Product "q" on photo 1; "near" on photo 0 (distance 1); ten products on photo 2 (all sqrt 5 from q):
# with k = 4 the tie straddles the 4th place, and only t0, t1, t2 may take it.
TIED = {"q": 1, "near": 0, **{f"t{i}": 2 for i in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)}, "far": 3}


def test_similar_cli_http_and_feed_cut_a_tie_by_product_id(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    settings = small_settings(tmp_path, artefact=artefact[0])
    dim, model = artefact[1].embedding_dim, artefact[1].model_version
    k = 4
    want = expected(TIED, "q", k, dim)
    assert want == ["near", "t0", "t1", "t2"]
    with open_index(settings.qdrant) as index:
        write_points(index, TIED, dim, model)
        assert [h.product_id for h in query.similar_to_product(index, "q", k)] == want
        make_feed(index, FeedRules(k=k), tmp_path / "feed.jsonl", "jsonl")
    feed = {
        entry["product_id"]: [n["product_id"] for n in entry["neighbours"]]
        for entry in map(json.loads, (tmp_path / "feed.jsonl").read_text().splitlines())
    }
    assert feed["q"] == want
    assert all(feed[p] == expected(TIED, p, k, dim) for p in TIED)  # t* share q's tie too

    done = run_visrec(settings, "similar", "q", "-k", str(k), "--json")
    assert done.returncode == 0, done.stderr
    assert [h["product_id"] for h in json.loads(done.stdout)] == want
    ran = run_visrec(settings, "neighbours", "--out", str(tmp_path / "cli.jsonl"), "-k", str(k))
    assert ran.returncode == 0, ran.stderr
    line = next(json.loads(x) for x in (tmp_path / "cli.jsonl").read_text().splitlines() if '"q"' in x)
    assert [n["product_id"] for n in line["neighbours"]] == want

    with TestClient(create_app(settings, torch.device("cpu"))) as client:
        answer = client.get("/products/q/similar", params={"k": k})
    assert answer.status_code == 200, answer.text
    assert [h["product_id"] for h in answer.json()["results"]] == want


def test_a_tie_deeper_than_the_first_fetch_is_fetched_deeper(
    tmp_path: Path, artefact: tuple[Path, Manifest]
) -> None:
    """Forty products share one photo: the first fetch (k + `TIES_AHEAD`) holds only some of them; the
    searches go deeper until their last hit is past the tie."""
    settings = small_settings(tmp_path, artefact=artefact[0])
    dim, model = artefact[1].embedding_dim, artefact[1].model_version
    photos = {"q": 1, **{f"s{i:02d}": 2 for i in range(39, -1, -1)}}
    with open_index(settings.qdrant) as index:
        write_points(index, photos, dim, model)
        for k in (1, 2, 5):
            assert [h.product_id for h in query.similar_to_product(index, "q", k)] == [
                f"s{i:02d}" for i in range(k)
            ]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ties")


catalogues = st.dictionaries(
    st.text("abcxyz", min_size=1, max_size=3), st.integers(0, 3), min_size=2, max_size=14
)


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(photos=catalogues, k=st.integers(1, 6))
def test_any_catalogue_of_shared_photos_cuts_by_distance_then_id(
    photos: dict[str, int], k: int, shared: Path, artefact: tuple[Path, Manifest]
) -> None:
    dim, model = artefact[1].embedding_dim, artefact[1].model_version
    qdrant = QdrantSettings(path=shared, collection=f"c{abs(hash((tuple(photos.items()), k)))}")
    with open_index(qdrant) as index:
        if not index.exists():
            write_points(index, photos, dim, model)
        listed = {
            x.product_id: [h.product_id for h in x.hits]
            for x in lists_for(index, [(p, {"product_id": p}) for p in photos], FeedRules(k=k))
        }
        for product in photos:
            want = expected(photos, product, k, dim)
            assert [h.product_id for h in query.similar_to_product(index, product, k, Filters())] == want
            assert listed[product] == want


@pytest.mark.parametrize("budget", [0, None], ids=["engine", "class matrix"])
def test_a_delta_does_not_let_a_moved_product_pass_unseen_ties_at_a_lists_reach(
    tmp_path: Path, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list keeps its nearest 2k by (distance, id): at its reach, tied products with larger ids than
    the last one kept were left out. A product moved to that very distance with a still larger id does
    not come within reach: mended from it, the list would skip the unseen ties (t2 … t9 here)."""
    from visrec import class_matrix

    if budget is not None:
        monkeypatch.setattr(class_matrix, "MATRIX_BYTES", budget)
    dim = 12
    photos = {"q": 1, **{f"t{i}": 2 for i in range(10)}, "far": 3}
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    with open_index(QdrantSettings(path=tmp_path / "store", collection="c")) as index:
        write_points(index, photos, dim, "m")
        rules = FeedRules(k=1, exact=True)
        make_feed(index, rules, feeds / "full.jsonl", "jsonl")
        index.delete(["t0", "t1"])
        index.upsert([IndexPoint("t95", base(dim, 2)[None, :], {"product_id": "t95", "model_version": "m"})])
        make_feed(index, rules, feeds / "delta.jsonl", "jsonl", since=feeds / "full.jsonl")
        make_feed(index, rules, feeds / "now.jsonl", "jsonl")

    def lists(path: Path) -> dict[str, Any]:
        return {
            e["product_id"]: e.get("deleted") or [n["product_id"] for n in e["neighbours"]]
            for e in map(json.loads, path.read_text().splitlines())
        }

    applied = lists(feeds / "full.jsonl")
    for product_id, entry in lists(feeds / "delta.jsonl").items():
        if entry is True:
            applied.pop(product_id)
        else:
            applied[product_id] = entry
    now = lists(feeds / "now.jsonl")
    assert now["q"] == ["t2"]
    assert applied == now
