from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import MakeCatalogue, cpu_embedder, run_sync, stored, write_shop
from visrec import query
from visrec.config import Settings
from visrec.errors import ImageError, InvalidFilter, InvalidQuery, NoMatch, NotFound
from visrec.filters import Filters, Where
from visrec.images import ImageLimits
from visrec.index import VectorIndex, open_index
from visrec.query import similar_to_image, similar_to_product, similar_to_vector


@pytest.fixture
def index(make_catalogue: MakeCatalogue, settings: Settings) -> Iterator[VectorIndex]:
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
        ({"where": ["title=red circle 0"]}, lambda p: p["title"] == "red circle 0"),
        ({"where": ["price=12.5..20"]}, lambda p: 12.5 <= p["price"] <= 20),
    ],
    ids=["category", "colour-any-of", "price-range", "combined", "payload-equality", "where", "where-range"],
)
def test_filters_return_only_matching_products(
    index: VectorIndex, filters: dict[str, Any], keep: Callable[[dict[str, Any]], bool]
) -> None:
    hits = similar_to_product(index, "p1", k=27, filters=Filters.parse(**filters))
    matching = [r for r in index.sync_records() if r != "p1" and keep(stored(index, r)[1])]
    assert hits and all(keep(h.payload) for h in hits)
    assert sorted(h.product_id for h in hits) == sorted(matching)


def test_similar_to_image_finds_the_same_photo_first(
    index: VectorIndex, settings: Settings, tmp_path: Path
) -> None:
    embedder = cpu_embedder(settings)
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
    # An empty price range is no mistake: it matches nothing, and says why (as over HTTP).
    empty = Filters.parse(price_min=10, price_max=5)
    assert similar_to_product(index, "p1", filters=empty) == []
    assert "takes nothing" in str(query.why_empty(index, empty))
    with pytest.raises(InvalidFilter, match="FIELD=VALUE"):
        Filters.parse(where=["brand"])
    assert Where.parse(" brand = acme ") == Where("brand", "acme")


@given(
    low=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    high=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    category=st.lists(st.text(max_size=3), max_size=4),
)
def test_filters_are_valid_or_an_invalid_filter(
    low: float | None, high: float | None, category: list[str]
) -> None:
    """Whoever builds them (CLI flags, HTTP query parameters, the recommend body), filters hold finite
    bounds and no blank category, or say why they cannot: NaN and ±inf never reach the engine (a NaN
    bound made qdrant-edge panic). Bounds out of order are an empty range, no error."""
    try:
        filters = Filters.parse(price_min=low, price_max=high, category=category)
    except InvalidFilter:
        assert any(b is not None and not math.isfinite(b) for b in (low, high))
        return
    bounds = [b for b in (filters.price_min, filters.price_max) if b is not None]
    assert all(math.isfinite(b) for b in bounds)
    assert filters.category == [c for c in category if c]


def test_colour_rerank_prefers_the_query_colour(index: VectorIndex) -> None:
    query_colour = stored(index, "p4")[1]["colour_extracted"]
    plain = similar_to_product(index, "p4", k=8)
    by_colour = similar_to_product(index, "p4", k=8, colour_weight=1.0)
    assert all(h.payload["colour_extracted"] == query_colour for h in by_colour)  # 8 others share it
    assert sum(h.payload["colour_extracted"] == query_colour for h in plain) < 8  # the rerank changed them
    assert by_colour != plain
    assert similar_to_product(index, "p4", k=8, colour_weight=0.0) == plain
    with pytest.raises(InvalidQuery, match="colour_weight"):
        similar_to_product(index, "p4", colour_weight=2)


@pytest.fixture(params=["csv", "jsonl"])
def shop(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[VectorIndex]:
    """A shop's 12 products (tests/helpers.py `write_shop`): its extra columns as text (CSV) or as JSON
    booleans and numbers (JSON lines)."""
    run_sync(write_shop(tmp_path, request.param), settings)
    with open_index(settings.qdrant) as opened:
        yield opened


def test_where_matches_text_booleans_and_numbers_alike(shop: VectorIndex) -> None:
    """`in_stock=true` finds the same products whether the catalogue said "true" (CSV) or true (JSON
    lines, where one product still says "true"); `size=40` the text "40" or the number 40."""
    payloads = {f"s{i}": stored(shop, f"s{i}")[1] for i in range(12) if i != 1}
    for clause in ("in_stock=true", "in_stock=false", "size=40", "brand=acme", "price=20..40"):
        where = Where.parse(clause)
        hits = similar_to_product(shop, "s1", 12, Filters.parse(where=[clause]))
        expected = {p for p, payload in payloads.items() if where.matches(payload[where.field])}
        assert hits and {h.product_id for h in hits} == expected, clause


MISTAKES: list[tuple[dict[str, Any], str]] = [
    (  # the catalogue says "shirt"
        {"category": ["Shirt"]},
        "no product has category 'Shirt' (did you mean 'shirt'?); "
        "category has jeans (4), shirt (4), shoe (4)",
    ),
    (
        {"colour": ["rde"]},
        "no product has colour 'rde' (did you mean 'red'?); colour has green (4), navy (4)",
    ),
    ({"colour": ["red", "nvay"]}, "no product has colour 'nvay' (did you mean 'navy'?)"),  # the shop's own
    ({"where": ["brnd=acme"]}, "no product has brnd=acme: no field 'brnd' is known (did you mean 'brand'?)"),
    (
        {"where": ["brand=acmee"]},
        "no product has brand=acmee (did you mean 'acme'?); brand has acme (6), zeta (6)",
    ),
    ({"where": ["in_stock=yes"]}, "no product has in_stock=yes; in_stock has true (9), false (3)"),
    (
        {"where": ["price=cheap"]},
        "no product has price=cheap (price holds numbers: a range is price=LOW..HIGH)",
    ),
    (  # a CSV's extra columns are text: a range takes numbers only
        {"where": ["size=40..42"]},
        "no product has size=40..42: a range matches numbers only, and size holds text; "
        "size has 38 (4), 40 (4)",
    ),
]


def test_a_condition_no_product_meets_is_an_error_naming_what_there_is(
    settings: Settings, tmp_path: Path
) -> None:
    """On the CSV shop, every mistake (a case, a typo, the shop's own colour misspelt, a field or value
    no product has, a range on text) is `NoMatch` naming what there is, searching and browsing alike."""
    run_sync(write_shop(tmp_path), settings)
    with open_index(settings.qdrant) as index:
        for filters, message in MISTAKES:
            with pytest.raises(NoMatch) as raised:
                similar_to_product(index, "s1", 5, Filters.parse(**filters))
            assert message in str(raised.value), filters
            with pytest.raises(NoMatch, match="no product has"):
                query.browse(index, Filters.parse(**filters), 5)
        assert similar_to_product(index, "s1", 3, Filters.parse(colour=["navy"]))  # the shop's own colour


def test_conditions_that_only_together_match_nothing_give_an_empty_answer_that_says_so(
    shop: VectorIndex,
) -> None:
    cases: list[tuple[dict[str, Any], list[str], str]] = [
        ({"category": ["shirt"], "colour": ["navy"]}, ["s1"], "no product meets them all together"),
        ({"where": ["brand=zeta", "price=10..30"]}, ["s1"], "no product meets them all together"),
        ({"price_min": 1000}, ["s1"], "no product has price 1000.."),
        (
            {"where": ["price=50..10"]},
            ["s1"],
            "price=50..10 takes nothing: its low end is above its high end",
        ),
        ({"where": ["price=10"]}, ["s0"], "only the products asked about meet these filters"),
    ]
    for chosen, exclude, note in cases:
        filters = Filters.parse(**chosen)
        assert similar_to_product(shop, exclude[0], 5, filters) == []
        assert note in (query.why_empty(shop, filters, exclude) or ""), chosen
    assert query.why_empty(shop, Filters(), ["s1"]) is None  # no filter: nothing to explain
