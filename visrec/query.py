"""Queries: products similar to a product, an image or a vector, under metadata filters and result rules.

Every query answers distinct products, ranked by their nearest photo, each saying which photo matched.
`Rules` (`visrec.rules`) then choose among an over-fetched set of neighbours. `Bounds` cap what one query
may cost, whatever its k, rules and the query product's photos: the neighbours its searches fetch in all
and the pool the rules choose among (docs/reliability.md measures the worst case).

Every entry validates its input and raises `InvalidQuery`/`InvalidFilter`/`NotFound` with a reason;
the CLI and the HTTP API only parse arguments and call these. A condition no product meets is `NoMatch`
(`visrec.matches`, with `why_empty` for an empty answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from visrec.colour import extract_colours
from visrec.config import ApiSettings
from visrec.embed import Embedder
from visrec.errors import InvalidQuery, NotFound
from visrec.images import ImageLimits, decode_image
from visrec.index import Filters, Hit, VectorIndex
from visrec.matches import Shown, check_caps, check_matches, check_scored, to_operators
from visrec.matches import why_empty as why_empty  # named here too: callers say `query.why_empty`
from visrec.rules import CAP_PATTERN as CAP_PATTERN  # likewise `query.CAP_PATTERN`, `query.MAX_CAPS`
from visrec.rules import MAX_CAPS as MAX_CAPS
from visrec.rules import MAX_K, NEAREST, Rules, choose, ranked

RERANK_POOL = 5  # a colour re-rank chooses k among k x this many visual neighbours
RULES_POOL = 10  # diversity and caps choose k among k x this many neighbours (at least POOL_MIN) …
POOL_MIN = 50  # … and, when caps leave fewer than k, among as many as `Bounds` allow
# Boosts and decays alone re-score k x this many neighbours (at least SCORED_MIN): their reach, smaller
# than the result rules' pool because every neighbour fetched costs the search (at 100,000 products,
# 10 x k cost a query +24 %, 2 x k +5 to 7 %: docs/queries.md).
SCORED_POOL = 2
SCORED_MIN = 20
# Ties at the k-th place go by product id: each search fetches this many past k, and deeper while its last
# hit still ties the k-th (`cut_at_k`), at most MAX_TIE_DEPTH (past that, many products share one photo).
TIES_AHEAD = 4
MAX_TIE_DEPTH = 10 * MAX_K
_API = ApiSettings()


@dataclass(frozen=True)
class Bounds:
    """What one query may cost (default: ApiSettings' own): its searches fetch at most `max_neighbours`
    neighbours in all. A product with several photos is one search per photo, each fetching the whole
    pool that result rules (diversity, caps, a colour re-rank) choose among: beyond the bound the pool
    shrinks towards k, and past that only the product's first `max_neighbours // k` photos are searched
    with. Reading a neighbour costs reading its photos' vectors (to say which matched), and diversity
    compares every pair in the pool: both are bounded by it."""

    max_neighbours: int = _API.max_neighbours

    @classmethod
    def from_settings(cls, api: ApiSettings) -> Bounds:
        return cls(api.max_neighbours)


BOUNDS = Bounds()


def browse(
    index: VectorIndex, filters: Filters, limit: int, after: str | None = None, shown: Shown = to_operators
) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """A page of (product id, payload) meeting `filters` and the next page's cursor
    (`VectorIndex.browse`); raises `NoMatch` for a condition no product meets."""
    page, next_page = index.browse(filters, limit, after)
    check_matches(index, filters, [payload for _, payload in page], shown)
    return page, next_page


def indexed(index: VectorIndex, product_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A product's vectors (photos × dim) and payload; raises `NotFound` if it is not indexed."""
    found = index.get(product_id)
    if found is None:
        raise NotFound(f"product {product_id!r} is not in the index")
    return found


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise InvalidQuery(f"k must be between 1 and {MAX_K}, got {k}")


def nearest(
    index: VectorIndex,
    vectors: np.ndarray,
    k: int,
    filters: Filters,
    exclude: Sequence[str] = (),
    bounds: Bounds = BOUNDS,
    exact: bool = False,
) -> list[Hit]:
    """The k products nearest to any of `vectors` (one row per query photo), each ranked by its
    nearest pair of photos: one search per row, merged, ties at the k-th place taken by product id
    (`cut_at_k`). Exact whenever each search is (`exact`: a full scan). At most `bounds.max_neighbours`
    neighbours in all: the first rows that fit (at least one)."""
    rows = query_rows(vectors, k, bounds)

    def search(row: int, depth: int) -> list[Hit]:
        return index.search(rows[row], depth, filters, exclude, exact)

    return cut_at_k([search(row, fetch_depth(k)) for row in range(len(rows))], k, search)


def query_rows(vectors: np.ndarray, k: int, bounds: Bounds = BOUNDS) -> np.ndarray:
    """The photos of a query that `nearest` searches with for k neighbours: the first that fit the
    bounds (at least one)."""
    return np.atleast_2d(vectors)[: max(1, bounds.max_neighbours // k)]


def merge_nearest(searches: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The k nearest distinct products of several searches (one per query photo), each at its nearest
    photo; ties broken by product id (among the hits given: `cut_at_k` makes sure they hold every tie)."""
    merged: dict[str, Hit] = {}
    for hits in searches:
        for hit in hits:
            if hit.product_id not in merged or hit.distance < merged[hit.product_id].distance:
                merged[hit.product_id] = hit
    return sorted(merged.values(), key=lambda h: (h.distance, h.product_id))[:k]


def fetch_depth(k: int) -> int:
    """How deep each search for k neighbours first fetches: past k, to see the hits tied with the k-th."""
    return k + TIES_AHEAD


def cut_at_k(
    searches: Sequence[Sequence[Hit]], k: int, search: Callable[[int, int], Sequence[Hit]]
) -> list[Hit]:
    """The one rule for the cut at k, `similar`'s and the feed's: the k nearest distinct products by
    (distance, product id) of `searches` (one per query photo, each `fetch_depth(k)` deep). The engine
    cuts arbitrarily among equal distances (products sharing a photo), so a search that filled its
    depth with its last hit no further than the k-th may have left out a product tied with it: it is
    searched again twice as deep (`search(i, depth)`: search i) until its last hit is further, it runs
    out, or it reaches `MAX_TIE_DEPTH`."""
    found = list(searches)
    depths = [fetch_depth(k)] * len(found)
    while True:
        cut = merge_nearest(found, k)
        if len(cut) < k:  # every search ran out: nothing was left out
            return cut
        deeper = [
            i
            for i, hits in enumerate(found)
            if len(hits) >= depths[i] and depths[i] < MAX_TIE_DEPTH and hits[-1].distance <= cut[-1].distance
        ]
        if not deeper:
            return cut
        for i in deeper:
            depths[i] = min(2 * depths[i], MAX_TIE_DEPTH)
            found[i] = search(i, depths[i])


def _neighbours(
    index: VectorIndex,
    vectors: np.ndarray,
    k: int,
    filters: Filters | None,
    exclude: Sequence[str] = (),
    rules: Rules = NEAREST,
    colour: tuple[Sequence[float], float] | None = None,
    bounds: Bounds = BOUNDS,
    shown: Shown = to_operators,
) -> list[Hit]:
    """The k products the query asks for: the nearest, or, with a colour (target Lab, weight) or
    active `rules`, those chosen among an over-fetched pool, within `bounds`. Raises `NoMatch` for a
    condition no product meets."""
    _check_k(k)
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise InvalidQuery("the query vector must be one-dimensional and finite")
    filters = filters or Filters()
    hits = chosen(index, vectors, k, filters, [*exclude, *rules.exclude], rules, colour, bounds)
    check_matches(index, filters, [hit.payload for hit in hits], shown)
    check_caps(index, rules.caps, [hit.payload for hit in hits], shown)
    check_scored(index, rules.boosts, rules.decays, shown, [hit.payload for hit in hits])
    return hits


def pool_sizes(
    k: int, photos: int, rules: Rules, colour_weight: float, bounds: Bounds = BOUNDS
) -> tuple[int, int]:
    """(the pool a query first chooses among, the furthest it may look when caps leave too few): k and k
    for plain nearest-first; else the largest pool the rules and the colour re-rank in use want."""
    if not rules.active and not colour_weight:
        return k, k
    wanted = 0
    if colour_weight:
        wanted = min(MAX_K, k * RERANK_POOL)
    if rules.scores:
        wanted = max(wanted, SCORED_MIN, k * SCORED_POOL)
    if rules.diversity or rules.max_per:
        wanted = max(wanted, POOL_MIN, k * RULES_POOL)
    # Every search of a query photo fetches the whole pool: a pool the photos' searches cannot afford
    # shrinks towards k first.
    limit = max(k, bounds.max_neighbours // photos)
    return min(wanted, limit), limit


def chosen(
    index: VectorIndex,
    vectors: np.ndarray,
    k: int,
    filters: Filters,
    exclude: Sequence[str],
    rules: Rules,
    colour: tuple[Sequence[float], float] | None,
    bounds: Bounds = BOUNDS,
    *,
    pool: list[Hit] | None = None,
    exact: bool = False,
) -> list[Hit]:
    """The k hits the rules and the colour re-rank choose (no filter check: `_neighbours` does it), in
    this order: the nearest pool, the colour re-rank, the boosts and decays (`rules.ranked`), then
    diversity and caps in that order. `pool`: the first pool already searched (`nearest` at
    `pool_sizes`' first size), as a batch of queries does; searched here otherwise. `exclude` is the
    search's (`VectorIndex.search`; the caller adds `rules.exclude`)."""
    if colour is not None and not 0 <= colour[1] <= 1:
        raise InvalidQuery(f"colour_weight must be between 0 and 1, got {colour[1]}")
    pool_size, limit = pool_sizes(k, len(vectors), rules, colour[1] if colour else 0.0, bounds)
    while True:
        if pool is None:
            pool = nearest(index, vectors, pool_size, filters, exclude, bounds, exact)
        if colour and colour[1]:
            pool = rerank_by_colour(pool, colour[0], colour[1], len(pool))
        pool = ranked(pool, rules)
        picked = choose(index, pool, vectors, k, rules) if rules.active else pool[:k]
        if len(picked) == k or len(pool) < pool_size or pool_size >= limit:
            return picked
        pool, pool_size = None, limit  # caps left too few: look further, once, as far as the bounds allow


def similar_to_vector(
    index: VectorIndex,
    vector: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    exclude: Sequence[str] = (),
    rules: Rules = NEAREST,
    bounds: Bounds = BOUNDS,
    shown: Shown = to_operators,
) -> list[Hit]:
    """The k products nearest to `vector` (Euclidean, to their nearest photo) that meet `filters`."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise InvalidQuery("the query vector must be one-dimensional and finite")
    return _neighbours(index, vector, k, filters, exclude, rules, bounds=bounds, shown=shown)


def rerank_by_colour(hits: list[Hit], target_lab: Sequence[float], weight: float, k: int) -> list[Hit]:
    """Re-order visual neighbours by a blend of visual distance and colour difference.

    score = (1 - weight) * distance / max distance + weight * min(ΔE76(colour_lab, target) / 100, 1).
    weight 0 keeps the visual order; 1 sorts by colour alone. A hit without a colour ranks as the most
    different colour. Distances in the result stay the visual ones; each hit's `score` is its blend.
    """
    if not 0 <= weight <= 1:
        raise InvalidQuery(f"colour_weight must be between 0 and 1, got {weight}")
    if not hits:
        return []
    scale = max(h.distance for h in hits) or 1.0
    target = np.asarray(target_lab, dtype=np.float64)

    def score(hit: Hit) -> float:
        lab = hit.payload.get("colour_lab")
        colour = 1.0 if lab is None else min(float(np.linalg.norm(np.asarray(lab) - target)) / 100, 1.0)
        return (1 - weight) * hit.distance / scale + weight * colour

    scored = [replace(hit, score=score(hit)) for hit in hits]
    return sorted(scored, key=lambda hit: hit.score or 0.0)[:k]


def similar_to_product(
    index: VectorIndex,
    product_id: str,
    k: int = 10,
    filters: Filters | None = None,
    colour_weight: float = 0.0,
    rules: Rules = NEAREST,
    bounds: Bounds = BOUNDS,
    shown: Shown = to_operators,
) -> list[Hit]:
    """The k products most like `product_id`, itself excluded, by the nearest pair of photos (all of its
    photos are queries); raises `NotFound` if it is not indexed.

    With `colour_weight` > 0, neighbours in the product's own colour are preferred (`rerank_by_colour`).
    """
    vectors, payload = indexed(index, product_id)
    if colour_weight and "colour_lab" not in payload:
        raise InvalidQuery(f"product {product_id!r} has no extracted colour: run `visrec sync` again")
    colour = (payload["colour_lab"], colour_weight) if colour_weight else None
    return _neighbours(index, vectors, k, filters, [product_id], rules, colour, bounds, shown)


def recommend(
    index: VectorIndex,
    positive: Sequence[str],
    negative: Sequence[str] = (),
    k: int = 10,
    filters: Filters | None = None,
    rules: Rules = NEAREST,
    bounds: Bounds = BOUNDS,
    shown: Shown = to_operators,
) -> list[Hit]:
    """Products like the `positive` ones and unlike the `negative` ones (e.g. a basket, skipped items).

    Qdrant's `average_vector` strategy: the target is avg(positive) + (avg(positive) - avg(negative)),
    a product counting as the mean of its photos. It is computed here so both backends answer alike
    (qdrant-edge has no such strategy) and distances stay Euclidean. The example products are
    excluded. Raises `NotFound` for an unknown id.
    """
    if not positive:
        raise InvalidQuery("recommend needs at least one positive product id")

    def mean_of(ids: Sequence[str]) -> np.ndarray:
        return np.mean([indexed(index, product_id)[0].mean(axis=0) for product_id in ids], axis=0)

    target = mean_of(positive)
    if negative:
        target = 2 * target - mean_of(negative)
    return similar_to_vector(index, target, k, filters, [*positive, *negative], rules, bounds, shown)


def similar_to_image(
    index: VectorIndex,
    embedder: Embedder,
    image_bytes: bytes,
    limits: ImageLimits,
    k: int = 10,
    filters: Filters | None = None,
    colour_weight: float = 0.0,
    rules: Rules = NEAREST,
    bounds: Bounds = BOUNDS,
    shown: Shown = to_operators,
) -> list[Hit]:
    """The k products most like a photo (with `colour_weight` > 0, preferring its colour); raises
    `ImageError` if it cannot be decoded. A JPEG is decoded at a reduced scale that still covers the
    model's input (libjpeg's DCT scaling: half the time and a fraction of the memory of a full decode)."""
    draft = embedder.manifest.preprocess.input_size
    image = decode_image(image_bytes, limits, name="query image", draft=draft)
    vector = embedder.embed_image(image)
    colour = (extract_colours(image).lab, colour_weight) if colour_weight else None
    return _neighbours(index, vector, k, filters, (), rules, colour, bounds, shown)
