"""Result rules on a real index (both backends): diversity (MMR) and caps per field value, and their
validation. Vectors are drawn in clusters, as product embeddings come (colourways of one shirt)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from visrec.config import QdrantSettings
from visrec.errors import InvalidQuery, NoMatch
from visrec.index import Filters, IndexPoint, VectorIndex, open_index
from visrec.query import similar_to_vector
from visrec.rules import Rules

DIM = 16
BRANDS = ("acme", "bolt", "cora", "dune")


def _clustered(n_clusters: int = 6, per_cluster: int = 12, seed: int = 0) -> list[IndexPoint]:
    """Tight clusters (one model in many colourways, one brand each) far apart; some have two photos."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, DIM)) * 5
    points = []
    for c in range(n_clusters):
        for j in range(per_cluster):
            i = c * per_cluster + j
            photos = 2 if i % 4 == 0 else 1
            vectors = centres[c] + 0.05 * rng.normal(size=(photos, DIM))
            payload = {
                "product_id": f"p{i}",
                "images": [f"p{i}-{n}.png" for n in range(photos)],
                "brand": BRANDS[c % len(BRANDS)],
                "cluster": c,
            }
            points.append(IndexPoint(f"p{i}", vectors.astype(np.float32), payload))
    return points


@pytest.fixture(scope="module", params=["embedded", "server-local"])
def index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorIndex]:
    url = ":memory:" if request.param == "server-local" else None
    settings = QdrantSettings(path=tmp_path_factory.mktemp("rules") / "q", url=url, collection="rules")
    with open_index(settings) as opened:
        opened.create(DIM)
        opened.upsert(_clustered())
        yield opened


def test_no_rules_is_the_nearest(index: VectorIndex) -> None:
    query = _clustered()[0].photo_vectors[0]
    plain = similar_to_vector(index, query, 8)
    assert similar_to_vector(index, query, 8, rules=Rules()) == plain
    assert {h.payload["cluster"] for h in plain} == {0}  # ten colourways of one shirt


def test_diversity_brings_other_clusters_in_and_stays_sorted(index: VectorIndex) -> None:
    query = _clustered()[0].photo_vectors[0]
    plain = similar_to_vector(index, query, 6)
    diverse = similar_to_vector(index, query, 6, rules=Rules(diversity=0.7))
    assert diverse != plain and diverse[0] == plain[0]  # the nearest always comes first
    assert len({h.payload["cluster"] for h in diverse}) > 1
    assert [h.distance for h in diverse] == sorted(h.distance for h in diverse)
    assert len({h.product_id for h in diverse}) == 6


def test_caps_hold_and_look_further_when_needed(index: VectorIndex) -> None:
    query = _clustered()[0].photo_vectors[0]
    capped = similar_to_vector(index, query, 4, rules=Rules(max_per=["brand=1"]))
    assert len(capped) == 4 and len({h.payload["brand"] for h in capped}) == 4
    assert [h.distance for h in capped] == sorted(h.distance for h in capped)
    # 4 brands x 2 = 8 at most, whatever k asks: fewer results, never a broken cap.
    most = similar_to_vector(index, query, 20, rules=Rules(max_per=["brand = 2"]))
    assert len(most) == 8 and max(Counter(h.payload["brand"] for h in most).values()) == 2


def test_a_cap_on_a_field_no_product_has_is_a_mistake(index: VectorIndex) -> None:
    """A misspelt field would cap nothing, silently (outside trial): refused, naming the fields there are."""
    query = _clustered()[0].photo_vectors[0]
    with pytest.raises(
        NoMatch, match="cannot cap by brnd: no field 'brnd' is known \\(did you mean 'brand'\\?\\)"
    ):
        similar_to_vector(index, query, 4, rules=Rules(max_per=["brnd=1"]))


@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    k=st.integers(1, 30),
    diversity=st.floats(0, 1),
    cap=st.one_of(st.none(), st.integers(1, 5)),
    which=st.integers(0, 71),
    category=st.booleans(),
)
def test_rules_hold_whatever_the_query(
    index: VectorIndex, k: int, diversity: float, cap: int | None, which: int, category: bool
) -> None:
    """Generated queries: distinct products, at most k, sorted by distance, filters and caps kept, the
    nearest allowed product first; without caps that bind, exactly k."""
    query = _clustered()[which].photo_vectors[-1] + 0.3
    filters = Filters(equals={"brand": "acme"}) if category else Filters()
    rules = Rules(diversity=diversity, max_per=[f"cluster={cap}"] if cap else [])
    hits = similar_to_vector(index, query, k, filters, rules=rules)
    nearest = similar_to_vector(index, query, k, filters)
    ids = [h.product_id for h in hits]
    assert len(ids) == len(set(ids)) <= k
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    assert not category or all(h.payload["brand"] == "acme" for h in hits)
    if cap:
        assert max(Counter(h.payload["cluster"] for h in hits).values()) <= cap
    else:
        assert len(hits) == len(nearest)
    assert hits[0].product_id == nearest[0].product_id


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"diversity": 1.5}, "diversity"),
        ({"diversity": float("nan")}, "diversity"),
        ({"max_per": ["brand"]}, "FIELD=N"),
        ({"max_per": ["brand=0"]}, "FIELD=N"),
        ({"max_per": ["=2"]}, "FIELD=N"),
        ({"max_per": ["brand=x"]}, "FIELD=N"),
        ({"max_per": ["image=1"]}, "not a product field"),
        ({"max_per": [f"f{i}=1" for i in range(6)]}, "max_per"),
    ],
)
def test_bad_rules_are_clear_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        Rules.parse(**fields)


def test_rules_parse_caps() -> None:
    assert Rules.parse(max_per=[" brand = 2", "colour=1"]).caps == {"brand": 2, "colour": 1}


def test_a_product_with_two_photos_is_one_hit(index: VectorIndex, tmp_path: Path) -> None:
    points = _clustered()
    two = next(p for p in points if len(p.photo_vectors) == 2)
    hits = similar_to_vector(index, two.photo_vectors[1], 5)
    assert hits[0].product_id == two.product_id and hits[0].matched == 1
    assert len({h.product_id for h in hits}) == 5


@pytest.mark.parametrize("url", [None, ":memory:"])
def test_a_field_every_product_lost_is_said_so(tmp_path: Path, url: str | None) -> None:
    """A field products held once and hold no more: a cap on it, or a filter, is refused saying so, never
    "silk (0)" nor a cap that caps nothing (outside trial)."""
    points = _clustered(2, 4)
    settings = QdrantSettings(path=tmp_path / "q", url=url, collection="lost")
    with open_index(settings) as index:
        index.create(DIM)
        first = points[0]
        index.upsert(
            [IndexPoint(first.product_id, first.vectors, {**first.payload, "fabric": "silk"}), *points[1:]]
        )
        index.upsert([first])  # its fabric removed
        query = first.photo_vectors[0]
        with pytest.raises(NoMatch, match="cannot cap by fabric: no product has a fabric now"):
            similar_to_vector(index, query, 3, rules=Rules(max_per=["fabric=1"]))
        with pytest.raises(NoMatch) as refused:
            similar_to_vector(index, query, 3, filters=Filters.parse(where=["fabric=silk"]))
        assert "(0)" not in str(refused.value), refused.value
