"""Queries: products similar to a product, an image or a vector, under metadata filters and result rules.

Every query answers distinct products, ranked by their nearest photo, each saying which photo matched.
`Rules` then choose among an over-fetched set of neighbours: diversity (maximal marginal relevance) and
caps per field value (at most N per brand); what they choose stays sorted by distance. `Bounds` cap what
one query may cost, whatever its k, rules and the query product's photos: the neighbours its searches
fetch in all and the pool the rules choose among (docs/reliability.md measures the worst case).

Every entry validates its input and raises `InvalidQuery`/`InvalidFilter`/`NotFound` with a reason;
the CLI and the HTTP API only parse arguments and call these. No answer is silently empty: a condition
that alone matches no product (a misspelt category, colour, field or value) is `NoMatch`, naming what
there is (the engine's facet counts); conditions that each match but together match nothing give an
empty answer, and `why_empty` says which case it is.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from visrec.colour import extract_colours
from visrec.config import ApiSettings
from visrec.embed import Embedder
from visrec.errors import InvalidQuery, NoMatch, NotFound, closest
from visrec.filters import Part
from visrec.images import ImageLimits, decode_image
from visrec.index import Filters, Hit, VectorIndex
from visrec.payload import HIDDEN_FROM_CALLERS, HIDDEN_FROM_OPERATORS

MAX_K = 1000
RERANK_POOL = 5  # a colour re-rank chooses k among k x this many visual neighbours
RULES_POOL = 10  # diversity and caps choose k among k x this many neighbours (at least POOL_MIN) …
POOL_MIN = 50  # … and, when caps leave fewer than k, among as many as `Bounds` allow
MAX_CAPS = 5
FACET_SHOWN = 10  # values a NoMatch message lists, the most frequent first
_API = ApiSettings()
# A cap, FIELD=N, as the schema states it: the same rule `Rules` checks (a field callers may see, at most
# N = MAX_K): a request the schema allows is never refused for its caps.
_HIDDEN = "|".join(sorted(HIDDEN_FROM_CALLERS))
# Only characters every regular-expression dialect reads alike (JSON Schema's is ECMAScript's, whose \s
# is not Python's).
CAP_PATTERN = (
    rf"^[ \t]*(?!(?:{_HIDDEN})[ \t]*=)[^= \t\r\n\f\v][^=]*="
    r"[ \t]*0*(?:[1-9][0-9]{0,2}|1000)[ \t]*$"  # N from 1 to MAX_K
)


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
_CAP = re.compile(r"[ \t]*([^= \t\r\n\f\v][^=]*?)[ \t]*=[ \t]*([0-9]+)[ \t]*")  # whole: fullmatch


class Rules(BaseModel):
    """How results are chosen among the nearest products. The defaults choose the nearest k."""

    model_config = ConfigDict(frozen=True)

    diversity: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="0: nearest first; up to 1: prefer products unlike those already chosen (MMR)",
    )
    # The pattern is for the schema; `_caps_parse` checks the same rule and says what is wrong.
    max_per: list[Annotated[str, WithJsonSchema({"type": "string", "pattern": CAP_PATTERN})]] = Field(
        default=[],
        max_length=MAX_CAPS,
        description=f"FIELD=N: at most N results with the same value of FIELD (e.g. brand=2); N from 1 to "
        f"{MAX_K}; FIELD a payload field callers are shown (api.public_fields, when set, narrows them)",
    )

    @field_validator("max_per")
    @classmethod
    def _caps_parse(cls, caps: list[str]) -> list[str]:
        for cap in caps:
            found = _CAP.fullmatch(cap)
            if not found or not 1 <= int(found.group(2)) <= MAX_K:
                raise ValueError(f"takes FIELD=N with 1 <= N <= {MAX_K}, got {cap!r}")
            if found.group(1) in HIDDEN_FROM_CALLERS:
                raise ValueError(f"cannot cap {found.group(1)!r}: not a product field")
        return caps

    @property
    def caps(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for cap in self.max_per if (m := _CAP.fullmatch(cap))}

    @property
    def active(self) -> bool:
        return bool(self.diversity or self.max_per)

    @classmethod
    def of(cls, chosen: BaseModel) -> Rules:
        """The rules a caller chose in a larger, already validated model (the recommend body)."""
        return cls.model_construct(**{name: getattr(chosen, name) for name in Rules.model_fields})

    @classmethod
    def parse(cls, **fields: Any) -> Rules:
        """Validated rules; raises `InvalidQuery` with the reason."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise InvalidQuery(
                "; ".join(
                    f"{e['loc'][0] if e['loc'] else 'rules'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()
                )
            ) from exc


NEAREST = Rules()
Shown = Callable[[str], bool]  # which payload fields the asker may see: messages name no other


def to_operators(field: str) -> bool:
    """The CLI's audience: every field but sync's bookkeeping."""
    return field not in HIDDEN_FROM_OPERATORS


def check_matches(
    index: VectorIndex, filters: Filters, found: Sequence[dict[str, Any]], shown: Shown = to_operators
) -> None:
    """Raise `NoMatch` for the first condition of `filters` that alone matches no product. `found` are
    payloads the filters let through (an answer's): a condition one of them meets needs no count, so an
    answer that is not empty costs a count only for the any-of values none of its products hold. A range
    that takes no number is no mistake (nothing costs that little): a range on a field that holds no
    number is."""
    for part in filters.parts():
        if any(part.met_by(payload.get(part.field)) for payload in found) or index.count(part.alone):
            continue
        if part.value is None and index.count(Filters(numbers_in=[part.field])):
            continue
        raise NoMatch(_no_match(index, part, shown))


def _no_match(index: VectorIndex, part: Part, shown: Shown) -> str:
    """What there is instead of `part`: the field's values (the engine's facet counts), or the fields
    there are."""
    kinds = index.field_kinds()
    said = f"no product has {part.said}"
    if part.field not in kinds:
        fields = sorted(f for f in kinds if shown(f))
        guess = closest(part.field, fields)
        hint = f" (did you mean {guess!r}?)" if guess else ""
        return f"{said}: no field {part.field!r} is known{hint}; fields: {', '.join(fields)}"
    held = kinds[part.field]
    if part.value is None:  # a range
        if held <= {"number"}:
            return f"{said}: no product has a number in {part.field}"
        listed = _listed(index, part)
        return f"{said}: a range matches numbers only, and {part.field} holds {_kinds(held)}{listed}"
    if held == {"number"}:
        return f"{said} ({part.field} holds numbers: a range is {part.field}=LOW..HIGH)"
    return f"{said}{_listed(index, part)}"


def _kinds(held: frozenset[str]) -> str:
    return " and ".join({"text": "text", "bool": "booleans", "number": "numbers"}[k] for k in sorted(held))


def _listed(index: VectorIndex, part: Part) -> str:
    """The field's most frequent values and their counts, and the one `part` may misspell."""
    values = index.facet(part.field, FACET_SHOWN + 1)
    if values is None:  # several kinds: no one index counts them
        return f" ({part.field} holds {_kinds(index.field_kinds()[part.field])})"
    if not values:
        return f"; no product has a {part.field} now"
    shown = [json.dumps(v) if isinstance(v, bool) else v for v, _ in values]
    listed = ", ".join(f"{v} ({n})" for v, (_, n) in zip(shown[:FACET_SHOWN], values, strict=False))
    more = ", …" if len(values) > FACET_SHOWN else ""
    guess = closest(part.value, shown) if part.value is not None else None
    hint = f" (did you mean {guess!r}?)" if guess is not None and guess != part.value else ""
    return f"{hint}; {part.field} has {listed}{more}"


def why_empty(index: VectorIndex, filters: Filters, exclude: Sequence[str] = ()) -> str | None:
    """Why an answer under `filters` (without the `exclude` products) is empty; None without filters.
    Call it after `check_matches` passed: each condition alone matches some product."""
    parts = filters.parts()
    if not parts:
        return None
    for part in parts:
        if part.inverted:
            return f"{part.said} takes nothing: its low end is above its high end"
        if part.value is None and not index.count(part.alone):
            return f"no product has {part.said}"
    if exclude and index.count(filters):
        return "only the products asked about meet these filters"
    return "each filter matches some product, but no product meets them all together"


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
) -> list[Hit]:
    """The k products nearest to any of `vectors` (one row per query photo), each ranked by its
    nearest pair of photos: one search per row, merged. Exact whenever each search is. At most
    `bounds.max_neighbours` neighbours in all: the first rows that fit (at least one)."""
    merged: dict[str, Hit] = {}
    rows = np.atleast_2d(vectors)
    for vector in rows[: max(1, bounds.max_neighbours // k)]:
        for hit in index.search(vector, k, filters, exclude):
            if hit.product_id not in merged or hit.distance < merged[hit.product_id].distance:
                merged[hit.product_id] = hit
    return sorted(merged.values(), key=lambda h: h.distance)[:k]


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
    hits = _chosen(index, vectors, k, filters, exclude, rules, colour, bounds)
    check_matches(index, filters, [hit.payload for hit in hits], shown)
    return hits


def _chosen(
    index: VectorIndex,
    vectors: np.ndarray,
    k: int,
    filters: Filters,
    exclude: Sequence[str],
    rules: Rules,
    colour: tuple[Sequence[float], float] | None,
    bounds: Bounds,
) -> list[Hit]:
    if colour is not None and not 0 <= colour[1] <= 1:
        raise InvalidQuery(f"colour_weight must be between 0 and 1, got {colour[1]}")
    if not rules.active and not (colour and colour[1]):
        return nearest(index, vectors, k, filters, exclude, bounds)
    wanted = min(MAX_K, k * RERANK_POOL) if not rules.active else max(POOL_MIN, k * RULES_POOL)
    # Every search of a query photo fetches the whole pool: a pool the photos' searches cannot afford
    # shrinks towards k first.
    limit = max(k, bounds.max_neighbours // len(vectors))
    pool_size = min(wanted, limit)
    while True:
        pool = nearest(index, vectors, pool_size, filters, exclude, bounds)
        if colour and colour[1]:
            pool = rerank_by_colour(pool, colour[0], colour[1], len(pool))
        chosen = choose(index, pool, vectors, k, rules) if rules.active else pool[:k]
        if len(chosen) == k or len(pool) < pool_size or pool_size >= limit:
            return chosen
        pool_size = limit  # caps left too few: look further, once, as far as the bounds allow


def choose(index: VectorIndex, pool: list[Hit], query: np.ndarray, k: int, rules: Rules) -> list[Hit]:
    """Up to k hits of `pool` that keep `rules`, in the pool's order (by distance, or the colour
    re-rank's).

    Caps skip a hit whose field value already has its N (a hit without the field is never capped).
    Diversity picks, each time, the hit maximising (1 - d) * relevance + d * novelty, where relevance
    is minus its distance to the query and novelty its distance to the nearest hit chosen so far
    (between the photos that matched), both over the pool's largest distance to the query (maximal
    marginal relevance, Carbonell & Goldstein 1998; d = `rules.diversity`, 0 keeps the preference
    order). The distances between the pool's matched photos are one matrix product, and each pick is
    a few array operations: O(pool² · dim + k · pool) in all, not a Python loop over k × pool.
    """
    caps = rules.caps
    keys = [_cap_keys(hit, caps) for hit in pool]
    holders: dict[tuple[str, str], list[int]] = {}
    for i, hit_keys in enumerate(keys):
        for key in hit_keys:
            holders.setdefault(key, []).append(i)
    counts: Counter[tuple[str, str]] = Counter()
    available = np.ones(len(pool), dtype=bool)
    d = rules.diversity
    if d:
        distance = np.array([hit.distance for hit in pool], dtype=np.float64)
        scale = float(distance.max(initial=0.0)) or 1.0
        between = _matched_distances(index, pool)
        novelty = np.full(len(pool), np.inf)
    chosen: list[int] = []
    while len(chosen) < k:
        candidates = np.flatnonzero(available)
        if not candidates.size:
            break
        pick = int(candidates[0])
        if d and chosen:
            score = -(1 - d) * distance[candidates] / scale + d * novelty[candidates] / scale
            pick = int(candidates[int(np.argmax(score))])
        chosen.append(pick)
        available[pick] = False
        for key in keys[pick]:
            counts[key] += 1
            if counts[key] >= caps[key[0]]:
                available[holders[key]] = False
        if d:
            novelty = np.minimum(novelty, between[pick])
    return [pool[i] for i in sorted(chosen)]


def _matched_distances(index: VectorIndex, pool: list[Hit]) -> np.ndarray:
    """Euclidean distances between the pool's hits, each by the photo that matched (pool × pool). A hit
    whose vectors are gone (deleted meanwhile) is at distance 0 from all: diversity never prefers it."""
    photos = index.vectors([hit.product_id for hit in pool])
    found = [hit.product_id in photos for hit in pool]
    dim = next((v.shape[-1] for v in photos.values()), 1)
    matched = np.zeros((len(pool), dim), dtype=np.float32)
    for i, hit in enumerate(pool):
        if found[i]:
            vectors = np.atleast_2d(photos[hit.product_id])
            matched[i] = vectors[min(hit.matched, len(vectors) - 1)]
    squared = (matched * matched).sum(1)
    between = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * (matched @ matched.T), 0.0))
    missing = ~np.array(found, dtype=bool)
    between[missing, :] = 0.0
    between[:, missing] = 0.0
    return between


def _cap_keys(hit: Hit, caps: dict[str, int]) -> list[tuple[str, str]]:
    """The (field, value) pairs of `hit` that caps count; lists and objects compare by their JSON."""
    return [
        (field, json.dumps(hit.payload[field], sort_keys=True, default=str))
        for field in caps
        if hit.payload.get(field) is not None
    ]


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
    different colour. Distances in the result stay the visual ones.
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

    return sorted(hits, key=score)[:k]


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
