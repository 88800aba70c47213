"""A long exclude (a cart) dropped after the engine from an over-fetched pool answers what the engine's
exclude answers: the same products, order, distances and matched photos, on the embedded engine and on
qdrant-client's local mode (the server backend's code), whatever the list holds: ids that exist, ids
that do not, all of the nearest (more than the pool over-fetches: the fallback), duplicates. Through
`nearest`, `search_batch`, the rules (caps, diversity, boosts) and the neighbours feed. Generated
catalogues: `test_class_matrix.catalogues` (shared photos: exact ties; near-ties)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.test_class_matrix import DIM, _tied, catalogues
from visrec import class_matrix, query
from visrec.config import QdrantSettings
from visrec.feed_run import make_feed
from visrec.filters import Filters
from visrec.index import Hit, IndexPoint, SearchRequest, VectorIndex, open_index
from visrec.index.exclusion import ENGINE_EXCLUDE, EXCLUDE_SLACK, by_the_engine
from visrec.neighbours import FeedRules
from visrec.rules import Rules

BACKENDS = ("embedded", "server-local")


@contextmanager
def opened(backend: str, root: Path, points: list[IndexPoint]) -> Iterator[VectorIndex]:
    """A fresh collection of `points` on `backend`."""
    name = f"c{uuid.uuid4().hex[:8]}"
    settings = (
        QdrantSettings(path=root / name, collection="c")
        if backend == "embedded"
        else QdrantSettings(url=":memory:", collection=name)
    )
    with open_index(settings) as index:
        index.create(DIM, {"model_version": "m"})
        index.upsert(points)
        yield index


def _order(points: list[IndexPoint], vector: np.ndarray) -> list[str]:
    """The products by their nearest photo's distance to `vector` (numpy's, for drawing carts)."""
    distance = {p.product_id: float(np.linalg.norm(p.photo_vectors - vector, axis=1).min()) for p in points}
    return sorted(distance, key=lambda p: (distance[p], p))


def _seen(hits: list[Hit]) -> list[tuple[str, float, int]]:
    return [(h.product_id, h.distance, h.matched) for h in hits]


@st.composite
def carts(draw: st.DrawFn, order: list[str]) -> list[str]:
    """An exclude list: the first few of the nearest (up to all of them), others of the catalogue, ids no
    product has, repeats; often more distinct ids than the engine excludes itself."""
    nearest = order[: draw(st.integers(0, len(order)))]
    others = draw(st.lists(st.sampled_from(order), max_size=10))
    missing = [f"gone-{i}" for i in range(draw(st.sampled_from([0, 3, ENGINE_EXCLUDE, 40])))]
    cart = nearest + others + missing
    cart += draw(st.lists(st.sampled_from(cart), max_size=5)) if cart else []  # duplicates
    return draw(st.permutations(cart))


def _query(points: list[IndexPoint], data: st.DataObject) -> np.ndarray:
    """A product's photo (distance 0, and its twins' ties), or one nudged away."""
    photo = data.draw(st.sampled_from(points)).photo_vectors[0]
    return photo + np.float32(data.draw(st.sampled_from([0.0, 0.05, 1.0])))


@pytest.mark.parametrize("backend", BACKENDS)
@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(catalogue=catalogues(), k=st.integers(1, 15), data=st.data())
def test_a_long_exclude_answers_what_the_engines_exclude_answers(
    backend: str, catalogue: tuple[list[IndexPoint], int], k: int, data: st.DataObject, tmp_path: Path
) -> None:
    points, _ = catalogue
    vector = _query(points, data)
    cart = data.draw(carts(_order(points, vector)))
    filters = data.draw(st.sampled_from([Filters(), Filters(equals={"brand": points[0].payload["brand"]})]))
    rules = data.draw(
        st.sampled_from(
            [
                Rules(),
                Rules(max_per=["brand=1"]),
                Rules(diversity=0.5),
                Rules(boost=["kind=1"], max_per=["kind=2"]),
            ]
        )
    )
    requests = [SearchRequest(vector, n, filters, cart, ["product_id", "images"]) for n in (k, k + 4)]
    with opened(backend, tmp_path, points) as index:

        def answers() -> tuple[Any, ...]:
            return (
                _seen(query.nearest(index, vector, k, filters, cart, exact=True)),
                _seen(
                    query.similar_to_vector(
                        index, vector, k, filters, rules=rules.model_copy(update={"exclude": cart})
                    )
                ),
                [_cut(hits) for hits in index.search_batch(requests, exact=True)],
            )

        dropped = answers()
        with by_the_engine():
            engines = answers()
    assert dropped == engines
    nearest = dropped[0]
    assert not {p for p, _, _ in nearest} & set(cart)
    listed = [p for p in points if p.payload["brand"] == filters.equals.get("brand", p.payload["brand"])]
    assert len(nearest) == min(k, len({p.product_id for p in listed} - set(cart)))


def _cut(hits: list[Hit]) -> tuple[list[float], set[str]]:
    """A search's answer up to the engine's cut among equal distances: every distance, and the products
    nearer than the last (those at it may be any of the tied)."""
    last = hits[-1].distance if hits else 0.0
    return [h.distance for h in hits], {h.product_id for h in hits if h.distance < last}


@hypothesis_settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(catalogue=catalogues(), k=st.integers(1, 12), data=st.data())
def test_the_backends_agree_on_a_long_exclude(
    catalogue: tuple[list[IndexPoint], int], k: int, data: st.DataObject, tmp_path: Path
) -> None:
    points, _ = catalogue
    vector = _query(points, data)
    cart = data.draw(carts(_order(points, vector)))
    found = []
    for backend in BACKENDS:
        with opened(backend, tmp_path, points) as index:
            found.append(query.nearest(index, vector, k, Filters(), cart, exact=True))
    edge, server = found  # their float32 sums may round apart: tied products may swap
    assert _tied(edge, server), (_seen(edge), _seen(server))
    np.testing.assert_allclose([h.distance for h in edge], [h.distance for h in server], rtol=1e-4, atol=1e-4)


@contextmanager
def depths(index: VectorIndex) -> Iterator[list[tuple[int, int]]]:
    """(depth, ids the engine excludes) of each search the engine runs within."""
    asked: list[tuple[int, int]] = []
    search: Callable[..., list[Hit]] = index._search

    def counted(vector: np.ndarray, k: int, filters: Filters, exclude: list[str], exact: bool) -> list[Hit]:
        asked.append((k, len(exclude)))
        return search(vector, k, filters, exclude, exact)

    with patch.object(index, "_search", counted):
        yield asked


def _line(n: int) -> list[IndexPoint]:
    """Products p0… on a line, p_i at distance i from the origin."""
    return [
        IndexPoint(
            f"p{i}", np.eye(DIM, dtype=np.float32)[0] * i, {"product_id": f"p{i}", "images": ["a.png"]}
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_where_each_exclude_is_applied(backend: str, tmp_path: Path) -> None:
    """A short list goes to the engine; a long one is over-fetched by EXCLUDE_SLACK and dropped, in one
    search while at most that many of the nearest are in it, else the engine excludes them all in a
    second (the fallback: without it, fewer than k would come back)."""
    origin = np.zeros(DIM, np.float32)
    far = [f"x{i}" for i in range(40)]  # none of them a product
    with opened(backend, tmp_path, _line(60)) as index, depths(index) as asked:
        hits = index.search(origin, 5, Filters(), ["p0", "p2"])
        assert [h.product_id for h in hits] == ["p1", "p3", "p4", "p5", "p6"]
        assert asked == [(5, 2)]
        asked.clear()
        near = [f"p{i}" for i in range(EXCLUDE_SLACK)]
        hits = index.search(origin, 5, Filters(), [*near, *far])
        assert [h.product_id for h in hits] == [f"p{i}" for i in range(EXCLUDE_SLACK, EXCLUDE_SLACK + 5)]
        assert asked == [(5 + EXCLUDE_SLACK, 0)]
        asked.clear()
        near = [f"p{i}" for i in range(EXCLUDE_SLACK + 1)]
        hits = index.search(origin, 5, Filters(), [*near, *far])
        assert [h.product_id for h in hits] == [f"p{i}" for i in range(EXCLUDE_SLACK + 1, EXCLUDE_SLACK + 6)]
        assert asked == [(5 + EXCLUDE_SLACK, 0), (5, len(near) + len(far))]
        asked.clear()
        everything = [f"p{i}" for i in range(60)]
        assert index.search(origin, 5, Filters(), everything) == []
        kept = index.search(origin, 5, Filters(), [*everything[:57], *far, "p0"])
        assert [h.product_id for h in kept] == ["p57", "p58", "p59"]  # the engine ran out: all that is left
        assert asked == [(5 + EXCLUDE_SLACK, 0), (5, 60), (5 + EXCLUDE_SLACK, 0), (5, 98)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_feed_with_a_long_exclude_is_the_engines(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The neighbours feed (its search batches through the engine) with a cart of the catalogue's first 40
    products."""
    monkeypatch.setattr(class_matrix, "MATRIX_BYTES", 0)  # no class in memory: every search the engine's
    rng = np.random.default_rng(5)
    points = [
        IndexPoint(
            f"p{i}",
            rng.standard_normal((1 + i % 2, DIM)).astype(np.float32),
            {"product_id": f"p{i}", "images": [f"{j}.png" for j in range(1 + i % 2)], "brand": "ab"[i % 2]},
        )
        for i in range(90)
    ]
    rules = FeedRules(k=6, rules=Rules(exclude=[f"p{i}" for i in range(40)]), exact=True)
    feeds = []
    with opened(backend, tmp_path, points) as index:
        for engine in (False, True):
            out = tmp_path / f"feed-{engine}.jsonl"
            with by_the_engine() if engine else nullcontext():
                make_feed(index, rules, out, "jsonl")
            feeds.append(sorted(out.read_text().splitlines()))
    assert feeds[0] == feeds[1]
