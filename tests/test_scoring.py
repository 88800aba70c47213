"""The shop's rules on a real index (both backends): `exclude`, boosts and a date decay, their formula's
properties (Hypothesis over generated payloads and weights), how they compose with filters, caps,
diversity and the colour re-rank, and their validation."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from visrec.config import QdrantSettings
from visrec.errors import InvalidQuery, NoMatch
from visrec.index import Filters, Hit, IndexPoint, VectorIndex, open_index
from visrec.query import nearest, pool_sizes, rerank_by_colour, similar_to_vector
from visrec.rules import MAX_EXCLUDE, Rules
from visrec.scoring import bucket, duration_s, origin, rescore, timestamp_of, value_of

DIM = 8
NOW = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)  # dates are ages from it
STOCK = (True, False, "true", "false", None)  # None: no such field


def _points(n: int = 60, seed: int = 3) -> list[IndexPoint]:
    """Products in a few clusters, with stock (booleans, CSV text, missing), a margin (numbers, text,
    missing) and an arrival date; p50..p53 are twins (one vector) of different dates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, DIM)) * 3
    twin = rng.normal(size=DIM)
    points = []
    for i in range(n):
        vector = twin if 50 <= i < 54 else centres[i % 4] + rng.normal(size=DIM)
        payload: dict[str, Any] = {
            "product_id": f"p{i}",
            "images": [f"p{i}.png"],
            "brand": ("acme", "bolt", "cora")[i % 3],
            "colour_lab": [float(i % 5) * 20, 0.0, 0.0],
            "added": (NOW - timedelta(days=int(rng.integers(0, 700)) + i)).date().isoformat(),
        }
        if (stock := STOCK[i % 5]) is not None:
            payload["in_stock"] = stock
        if i % 3:
            payload["margin"] = float(rng.integers(0, 40)) if i % 2 else f"{rng.integers(0, 40)}.5"
        points.append(IndexPoint(f"p{i}", vector[None, :].astype(np.float32), payload))
    return points


def _open(root: Path, url: str | None) -> VectorIndex:
    index = open_index(QdrantSettings(path=root / "q", url=url, collection="shop"))
    index.create(DIM)
    index.upsert(_points())
    return index


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VectorIndex, VectorIndex]]:
    """The same products in the embedded engine and in qdrant-client's local mode."""
    with (
        _open(tmp_path_factory.mktemp("edge"), None) as edge,
        _open(tmp_path_factory.mktemp("server"), ":memory:") as server,
    ):
        yield edge, server


def _query(which: int) -> np.ndarray:
    return _points()[which].photo_vectors[0] + 0.2


def _score(hit: Hit) -> float:
    """The score a hit shows (its distance where no rule scored it)."""
    return float(hit.to_dict(dict)["score"])


def _in_stock(hit: Hit) -> bool:
    return value_of(hit.payload.get("in_stock")) == 1.0


# The formula, alone.


@pytest.mark.parametrize(
    ("value", "counts"),
    [(True, 1), (False, 0), ("true", 1), ("False", 0), (" 2.5 ", 2.5), ("-3", -3), (4, 4), (None, 0)]
    + [("red", 0), ("nan", 0), ("inf", 0), (float("nan"), 0), ([1], 0), ({"a": 1}, 0)]
    + [("1e999", math.inf), ("-1e999", -math.inf), (10**400, math.inf)],  # too large: largest, never 0
)
def test_what_a_value_counts_as(value: object, counts: float) -> None:
    assert value_of(value) == counts


def test_dates_and_durations_read() -> None:
    assert timestamp_of("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC).timestamp()
    assert timestamp_of("2024-05-01T10:00:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC).timestamp()
    assert timestamp_of("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()
    assert [timestamp_of(v) for v in ("May 1st", 20240501, "", None)] == [None] * 4
    assert [duration_s(d) for d in ("30d", "12h", "1.5w", " 90 m", "45s")] == [
        30 * 86400,
        12 * 3600,
        1.5 * 7 * 86400,
        5400,
        45,
    ]
    assert [duration_s(d) for d in ("0d", "30", "d", "-1d", "1y", "P30D", "nand", "1e3d")] == [None] * 8


def test_the_worked_example_of_the_docs() -> None:
    """docs/queries.md, "Boost and decay": in_stock=1 and added=30d."""
    now = origin(NOW.timestamp(), 30 * 86400) + 60  # a minute into a bucket: ages from its start
    start = origin(now, 30 * 86400)
    a = Hit("a", 10.0, {"in_stock": "false", "added": _ago(start, 0)})
    b = Hit("b", 12.0, {"in_stock": True, "added": _ago(start, 30)})
    c = Hit("c", 15.0, {"in_stock": "true", "added": _ago(start, 0)})
    ranked = rescore([a, b, c], {"in_stock": 1.0}, {"added": 30 * 86400.0}, now)
    assert [(h.product_id, h.score) for h in ranked] == [("c", 7.5), ("a", 10.0), ("b", 12.0)]


def _ago(start: float, days: float) -> str:
    return datetime.fromtimestamp(start - days * 86400, UTC).isoformat()


_values = st.one_of(
    st.booleans(),
    st.floats(-1e6, 1e6),
    st.integers(-1000, 1000),
    st.sampled_from(["true", "false", "3", "-2.5", "x", "", "1e306", "1e309", "-1e309"]),
    st.none(),
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    distances=st.lists(st.floats(0.01, 100), min_size=2, max_size=12),
    weights=st.lists(st.floats(-100, 100).filter(bool), min_size=1, max_size=3),
    values=st.data(),
    exponents=st.lists(st.integers(-2, 400), min_size=2, max_size=2),
)
def test_a_value_spelt_too_large_for_a_float_still_ranks_by_size(
    distances: list[float], weights: list[float], values: st.DataObject, exponents: list[int]
) -> None:
    """The outside review's orders: text numbers near and past a float's range ("1e309" is infinite), on
    one field or beside another, never rank a product lower as its boosted value rises."""
    fields = [f"f{i}" for i in range(len(weights))]
    boosts = dict(zip(fields, weights, strict=True))
    hits = [Hit(f"p{i}", d, {f: values.draw(_values) for f in fields}) for i, d in enumerate(distances)]
    low, high = sorted(exponents)
    raised = fields[0]
    ranks = []
    for power in (low, high):
        hits[0] = Hit("p0", distances[0], {**hits[0].payload, raised: f"1e{power}"})
        ranks.append([h.product_id for h in rescore(hits, boosts, {}, 0.0)].index("p0"))
    assert (ranks[1] <= ranks[0]) if boosts[raised] > 0 else (ranks[1] >= ranks[0])


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    distances=st.lists(st.floats(0.01, 100), min_size=2, max_size=30),
    values=st.data(),
    weight=st.floats(0.01, 100),
    raised=st.floats(0.01, 1e6),
)
def test_raising_a_value_never_lowers_a_rank(
    distances: list[float], values: st.DataObject, weight: float, raised: float
) -> None:
    hits = [
        Hit(f"p{i}", d, {"margin": values.draw(_values)} if i % 4 else {}) for i, d in enumerate(distances)
    ]
    which = values.draw(st.integers(0, len(hits) - 1))
    before = [h.product_id for h in rescore(hits, {"margin": weight}, {}, 0.0)].index(f"p{which}")
    higher = value_of(hits[which].payload.get("margin")) + raised
    hits[which] = Hit(f"p{which}", distances[which], {"margin": higher})
    after = [h.product_id for h in rescore(hits, {"margin": weight}, {}, 0.0)].index(f"p{which}")
    assert after <= before


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    ages=st.lists(st.floats(0, 3000), min_size=2, max_size=20, unique=True),
    scale=st.sampled_from([86400.0, 30 * 86400.0, 365 * 86400.0]),
)
def test_a_decay_orders_equally_close_products_by_date(ages: list[float], scale: float) -> None:
    start = origin(NOW.timestamp(), scale)
    hits = [Hit(f"p{i}", 5.0, {"added": _ago(start, age)}) for i, age in enumerate(ages)]
    ranked = rescore(hits, {}, {"added": scale}, NOW.timestamp())
    dates = [timestamp_of(h.payload["added"]) or 0.0 for h in ranked]
    capped = [min(a, 64 * scale / 86400) for a in ages]  # 64 SCALEs old or more: as old as it counts
    if len(set(capped)) == len(capped):
        assert dates == sorted(dates, reverse=True)
    assert all(h.score is not None and math.isfinite(h.score) for h in ranked)


def _documented(
    payload: dict[str, Any], boosts: dict[str, float], decays: dict[str, float], now: float
) -> float:
    """The exponent as docs/queries.md writes it, one product at a time."""
    total = 0.0
    for field, scale in decays.items():
        stamp = timestamp_of(payload.get(field))
        total += 64.0 if stamp is None else min(max(origin(now, scale) - stamp, 0.0) / scale, 64.0)
    for field, weight in boosts.items():
        total -= min(max(weight * value_of(payload.get(field)), -1e9), 1e9)
    return min(max(total, -1000.0), 1000.0)


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    distances=st.lists(st.floats(0, 100), min_size=1, max_size=40),
    values=st.data(),
    weights=st.lists(st.floats(-100, 100).filter(bool), max_size=3),
    scales=st.lists(st.sampled_from([3600.0, 86400.0, 30 * 86400.0]), max_size=2),
    dates=st.lists(st.one_of(st.none(), st.integers(-5, 900)), min_size=40, max_size=40),
)
def test_the_pool_is_scored_by_the_documented_formula(
    distances: list[float],
    values: st.DataObject,
    weights: list[float],
    scales: list[float],
    dates: list[int | None],
) -> None:
    """`rescore` works on the pool as arrays: each score is the documented formula's, to the last bit
    but for 2^x itself, and the order is (score, exponent, closeness, id)."""
    now = NOW.timestamp() + 1234.5
    boosts = {f"b{i}": w for i, w in enumerate(weights)}
    decays = {f"d{i}": s for i, s in enumerate(scales)}
    hits = []
    for i, distance in enumerate(distances):
        payload: dict[str, Any] = {field: values.draw(_values) for field in boosts}
        if (days := dates[i]) is not None:
            payload |= {field: (NOW - timedelta(days=days)).isoformat() for field in decays}
        hits.append(Hit(f"p{i % 7}-{i}", distance, payload))
    ranked = rescore(hits, boosts, decays, now)
    expected = {h.product_id: _documented(h.payload, boosts, decays, now) for h in hits}
    for hit in ranked:
        assert hit.score == pytest.approx(hit.distance * 2.0 ** expected[hit.product_id], rel=1e-12, abs=0)
    keys = [(h.score, expected[h.product_id], h.distance, h.product_id) for h in ranked]
    assert keys == sorted(keys)


def test_scores_stay_finite_at_the_extremes() -> None:
    hits = [Hit("old", 1e3, {"added": "1900-01-01", "price": -1e300}), Hit("new", 1e-3, {"price": 1e300})]
    ranked = rescore(hits, {"price": 100.0}, {"added": 1.0}, NOW.timestamp())
    assert all(h.score is not None and math.isfinite(h.score) and h.score >= 0 for h in ranked)


# On both backends, through the query.


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, 59), k=st.integers(1, 20), field=st.sampled_from(["in_stock", "margin"]))
def test_weight_zero_is_the_plain_answer(
    both: tuple[VectorIndex, VectorIndex], which: int, k: int, field: str
) -> None:
    for index in both:
        plain = similar_to_vector(index, _query(which), k)
        zero = similar_to_vector(index, _query(which), k, rules=Rules(boost=[f"{field}=0"]))
        assert zero == plain
        assert all(h.to_dict(dict)["score"] == h.distance for h in zero)


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 59),
    k=st.integers(1, 15),
    stock=st.floats(-5, 100),
    margin=st.one_of(st.none(), st.floats(-1, 1)),
    decay=st.sampled_from([None, "30d", "365d", "12h"]),
    exclude=st.lists(st.integers(0, 59), max_size=8),
)
def test_both_backends_answer_alike(
    both: tuple[VectorIndex, VectorIndex],
    which: int,
    k: int,
    stock: float,
    margin: float | None,
    decay: str | None,
    exclude: list[int],
) -> None:
    """The rules score the over-fetched set after the engine: the same products, scores and order on
    the embedded engine and on a server; excluded ids never come back; every hit says its distance and
    its score."""
    rules = Rules(
        boost=[f"in_stock={stock:.3f}", *([f"margin={margin:.3f}"] if margin is not None else [])],
        decay=[f"added={decay}"] if decay else [],
        exclude=[f"p{i}" for i in exclude],
    )
    edge, server = (similar_to_vector(index, _query(which), k, rules=rules) for index in both)
    assert [h.product_id for h in edge] == [h.product_id for h in server]
    assert [_score(h) for h in edge] == pytest.approx([_score(h) for h in server], rel=1e-4)
    assert not {h.product_id for h in edge} & set(rules.exclude)
    assert all({"distance", "score"} <= set(h.to_dict(dict)) for h in edge)
    assert [_score(h) for h in edge] == sorted(_score(h) for h in edge)


@hypothesis_settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, 59), k=st.integers(1, 12))
def test_a_large_boost_puts_every_in_stock_neighbour_first(
    both: tuple[VectorIndex, VectorIndex], which: int, k: int
) -> None:
    """Within the pool the rules over-fetch, every in-stock product ranks before every other."""
    index = both[0]
    rules = Rules(boost=["in_stock=100"])
    pool = nearest(index, _query(which)[None, :], pool_sizes(k, 1, rules, 0.0)[0], Filters())
    in_stock = sorted((h for h in pool if _in_stock(h)), key=lambda h: (h.distance, h.product_id))
    hits = similar_to_vector(index, _query(which), k, rules=rules)
    expected = (in_stock + [h for h in pool if not _in_stock(h)])[:k]
    assert [h.product_id for h in hits] == [h.product_id for h in expected]


@pytest.mark.parametrize("k", [1, 5, 10, 40])
def test_the_pool_each_rule_over_fetches(k: int) -> None:
    """Boosts and decays alone: the 2 x k nearest, at least 20 (docs/queries.md); with caps or diversity
    those rules' 10 x k, at least 50; with a colour re-rank at least its 5 x k."""
    boost, decay = Rules(boost=["in_stock=1"]), Rules(decay=["added=30d"])
    assert pool_sizes(k, 1, boost, 0.0)[0] == pool_sizes(k, 1, decay, 0.0)[0] == max(2 * k, 20)
    assert pool_sizes(k, 1, Rules(boost=["in_stock=1"], max_per=["brand=1"]), 0.0)[0] == max(10 * k, 50)
    assert pool_sizes(k, 1, Rules(decay=["added=30d"], diversity=0.5), 0.0)[0] == max(10 * k, 50)
    assert pool_sizes(k, 1, boost, 0.5)[0] == max(5 * k, 2 * k, 20)
    assert pool_sizes(k, 1, Rules(boost=["in_stock=0"]), 0.0)[0] == k  # weight 0: no rule, no pool


def test_a_boost_reaches_the_pool_and_no_further(tmp_path: Path) -> None:
    """However boosted, a product past the pool is not lifted into the answer; one inside it is."""
    with _open(tmp_path, None) as index:
        k, rules = 5, Rules(boost=["lift=100"])
        pool = pool_sizes(k, 1, rules, 0.0)[0]
        ranked = nearest(index, _query(0)[None, :], pool + 10, Filters())
        inside, outside = ranked[pool - 1], ranked[pool + 5]
        for hit in (inside, outside):
            index.overwrite_payloads({hit.product_id: {**hit.payload, "lift": True}})
        answer = [h.product_id for h in similar_to_vector(index, _query(0), k, rules=rules)]
        assert answer[0] == inside.product_id and outside.product_id not in answer


def test_raising_one_products_value_through_the_store(tmp_path: Path) -> None:
    """Without diversity or caps, a product whose margin rises never ranks lower (written, re-read)."""
    with _open(tmp_path, None) as index:
        rules = Rules(boost=["margin=0.05"])
        hits = similar_to_vector(index, _query(0), 12, rules=rules)
        last = hits[-1]
        index.overwrite_payloads({last.product_id: {**last.payload, "margin": "1000"}})
        again = similar_to_vector(index, _query(0), 12, rules=rules)
        assert [h.product_id for h in again].index(last.product_id) < len(hits) - 1


def test_a_decay_orders_twins_by_date(both: tuple[VectorIndex, VectorIndex]) -> None:
    """p50..p53 share one vector: equally close, they come newest first."""
    for index in both:
        twins = _points()[50].photo_vectors[0]
        hits = similar_to_vector(index, twins, 4, rules=Rules(decay=["added=30d"]))
        assert {h.product_id for h in hits} == {"p50", "p51", "p52", "p53"}
        dates = [h.payload["added"] for h in hits]
        assert dates == sorted(dates, reverse=True)


def test_rules_compose_with_filters_caps_diversity_and_colour(both: tuple[VectorIndex, VectorIndex]) -> None:
    edge = both[0]
    boost = ["in_stock=100"]
    filtered = similar_to_vector(
        edge, _query(1), 6, Filters(equals={"brand": "acme"}), rules=Rules(boost=boost)
    )
    assert filtered and all(h.payload["brand"] == "acme" for h in filtered)
    capped = similar_to_vector(edge, _query(1), 6, rules=Rules(boost=boost, max_per=["brand=1"]))
    assert max(Counter(h.payload["brand"] for h in capped).values()) == 1
    assert [h.score for h in capped] == sorted(h.score or 0.0 for h in capped)
    diverse = similar_to_vector(edge, _query(1), 6, rules=Rules(boost=boost, diversity=0.5))
    assert len({h.product_id for h in diverse}) == 6 and _in_stock(diverse[0])
    # The colour re-rank's blend is the closeness the boost multiplies.
    pool = nearest(edge, _query(1)[None, :], 30, Filters())
    blended = {h.product_id: h.score for h in rerank_by_colour(pool, [0.0, 0.0, 0.0], 0.5, 30)}
    for hit in rescore(rerank_by_colour(pool, [0.0, 0.0, 0.0], 0.5, 30), {"in_stock": 1.0}, {}, 0.0):
        assert hit.score == pytest.approx(
            (blended[hit.product_id] or 0) * 2 ** -value_of(hit.payload.get("in_stock"))
        )


def test_a_time_bucket_is_a_hundredth_of_the_scale() -> None:
    day = 86400.0
    assert bucket(100 * day, 100 * day) == 100 and bucket(100 * day - 1, 100 * day) == 99


# Refused, clearly.


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"boost": ["in_stock"]}, "boost: takes FIELD=WEIGHT"),
        ({"boost": ["in_stock=nan"]}, "boost: takes FIELD=WEIGHT"),
        ({"boost": ["in_stock=inf"]}, "boost: takes FIELD=WEIGHT"),
        ({"boost": ["in_stock=1e3"]}, "boost: takes FIELD=WEIGHT"),
        ({"boost": ["in_stock=101"]}, "from -100 to 100"),
        ({"boost": ["=1"]}, "boost: takes FIELD=WEIGHT"),
        ({"boost": ["images=1"]}, "not a product field"),
        ({"boost": [f"f{i}=1" for i in range(6)]}, "boost"),
        ({"decay": ["added"]}, "decay: takes FIELD=SCALE"),
        ({"decay": ["added=30"]}, "a duration above 0"),
        ({"decay": ["added=0d"]}, "a duration above 0"),
        ({"decay": ["added=P30D"]}, "a duration above 0"),
        ({"exclude": [""]}, "exclude"),
        ({"exclude": ["x" * 257]}, "exclude"),
        ({"exclude": [f"p{i}" for i in range(MAX_EXCLUDE + 1)]}, "exclude"),
    ],
)
def test_bad_rules_are_clear_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        Rules.parse(**fields)


@hypothesis_settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30), kind=st.sampled_from(["boost", "decay"]))
def test_any_text_parses_or_is_refused_clearly(text: str, kind: str) -> None:
    try:
        rules = Rules.parse(**{kind: [text]})
    except InvalidQuery as exc:
        assert str(exc).startswith(f"{kind}: ")
        return
    values = rules.boosts.values() if kind == "boost" else rules.decays.values()
    assert all(math.isfinite(v) for v in values)


def test_a_rule_on_a_field_no_product_has_is_a_mistake(both: tuple[VectorIndex, VectorIndex]) -> None:
    for index in both:
        with pytest.raises(NoMatch, match="cannot boost by in_stok: .*did you mean 'in_stock'") as said:
            similar_to_vector(index, _query(0), 4, rules=Rules(boost=["in_stok=1"]))
        listed = str(said.value).rpartition("fields: ")[2].split(", ")
        assert "in_stock" in listed and not {"product_id", "source"} & set(listed)  # rules refuse those
        with pytest.raises(NoMatch, match="cannot decay by price: it holds numbers, not dates"):
            similar_to_vector(index, _query(0), 4, rules=Rules(decay=["price=30d"]))
