from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import run_sync
from visrec.config import Settings
from visrec.embed import Embedder
from visrec.errors import ImageError, InvalidFilter, InvalidQuery, NotFound
from visrec.images import ImageLimits
from visrec.index import VectorIndex, open_index
from visrec.query import make_filters, parse_equals, similar_to_image, similar_to_product, similar_to_vector


@pytest.fixture
def index(make_catalogue, settings: Settings) -> Iterator[VectorIndex]:  # type: ignore[no-untyped-def]
    run_sync(make_catalogue(27), settings)  # 3 shapes x 3 colours x 3, prices 10.5 … 36.5
    with open_index(settings.qdrant) as opened:
        yield opened


def test_similar_to_product_excludes_itself(index: VectorIndex) -> None:
    hits = similar_to_product(index, "p4", k=5)
    assert len(hits) == 5 and "p4" not in [h.product_id for h in hits]
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


@pytest.mark.parametrize(
    ("filters", "keep"),
    [
        ({"category": ["circle"]}, lambda p: p["category"] == "circle"),
        ({"colour": ["red", "green"]}, lambda p: p["colour"] in {"red", "green"}),
        ({"price_min": 15, "price_max": 25}, lambda p: 15 <= p["price"] <= 25),
        (
            {"category": ["square"], "colour": ["blue"], "price_max": 30},
            lambda p: p["category"] == "square" and p["colour"] == "blue" and p["price"] <= 30,
        ),
        ({"equals": {"title": "red circle 0"}}, lambda p: p["title"] == "red circle 0"),
    ],
    ids=["category", "colour-any-of", "price-range", "combined", "payload-equality"],
)
def test_filters_return_only_matching_products(index: VectorIndex, filters, keep) -> None:  # type: ignore[no-untyped-def]
    hits = similar_to_product(index, "p1", k=27, filters=make_filters(**filters))
    matching = [r for r in index.sync_records() if r != "p1" and keep(index.get(r)[1])]  # type: ignore[index]
    assert hits and all(keep(h.payload) for h in hits)
    assert sorted(h.product_id for h in hits) == sorted(matching)


def test_similar_to_image_finds_the_same_photo_first(
    index: VectorIndex, settings: Settings, tmp_path: Path
) -> None:
    embedder = Embedder(settings.artefact, torch.device("cpu"))
    photo = (tmp_path / "images" / "p7.png").read_bytes()
    hits = similar_to_image(index, embedder, photo, ImageLimits(), k=3)
    assert hits[0].product_id == "p7" and hits[0].distance == pytest.approx(0, abs=1e-3)
    with pytest.raises(ImageError):
        similar_to_image(index, embedder, b"not an image", ImageLimits())


def test_invalid_queries(index: VectorIndex) -> None:
    with pytest.raises(NotFound, match="not in the index"):
        similar_to_product(index, "nope")
    with pytest.raises(InvalidQuery, match="k must be"):
        similar_to_product(index, "p1", k=0)
    with pytest.raises(InvalidQuery, match="finite"):
        similar_to_vector(index, np.full(1000, np.nan))
    with pytest.raises(InvalidFilter, match="above price_max"):
        make_filters(price_min=10, price_max=5)
    with pytest.raises(InvalidFilter, match="FIELD=VALUE"):
        parse_equals(["brand"])
    assert parse_equals(["brand = acme", "size=M"]) == {"brand": "acme", "size": "M"}


def test_colour_rerank_prefers_the_query_colour(index: VectorIndex) -> None:
    query_colour = index.get("p4")[1]["colour_extracted"]  # type: ignore[index]
    plain = similar_to_product(index, "p4", k=8)
    by_colour = similar_to_product(index, "p4", k=8, colour_weight=1.0)
    assert all(h.payload["colour_extracted"] == query_colour for h in by_colour)  # 8 others share it
    assert sum(h.payload["colour_extracted"] == query_colour for h in plain) <= 8
    assert similar_to_product(index, "p4", k=8, colour_weight=0.0) == plain
    with pytest.raises(InvalidQuery, match="colour_weight"):
        similar_to_product(index, "p4", colour_weight=2)
