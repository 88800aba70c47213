"""Queries: products similar to a product, an image or a vector, under metadata filters and result rules.

Every query answers distinct products, ranked by their nearest photo, each saying which photo matched.
`Rules` then choose among an over-fetched set of neighbours: diversity (maximal marginal relevance) and
caps per field value (at most N per brand); what they choose stays sorted by distance.

Every entry validates its input and raises `InvalidQuery`/`InvalidFilter`/`NotFound` with a reason;
the CLI and the HTTP API only parse arguments and call these.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visrec.colour import extract_colours
from visrec.embed import Embedder
from visrec.errors import InvalidQuery, NotFound
from visrec.images import ImageLimits, decode_image
from visrec.index import Filters, Hit, VectorIndex
from visrec.payload import HIDDEN_FROM_CALLERS

MAX_K = 1000
RERANK_POOL = 5  # a colour re-rank chooses k among k x this many visual neighbours
RULES_POOL = 10  # diversity and caps choose k among k x this many neighbours (at least POOL_MIN) …
POOL_MIN = 50
POOL_LIMIT = 4 * MAX_K  # … and, when caps leave fewer than k, among up to this many
MAX_CAPS = 5
_CAP = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*([0-9]+)\s*$")


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
    max_per: list[str] = Field(
        default=[],
        max_length=MAX_CAPS,
        description="FIELD=N: at most N results with the same value of FIELD (e.g. brand=2)",
    )

    @field_validator("max_per")
    @classmethod
    def _caps_parse(cls, caps: list[str]) -> list[str]:
        for cap in caps:
            found = _CAP.match(cap)
            if not found or not 1 <= int(found.group(2)) <= MAX_K:
                raise ValueError(f"takes FIELD=N with 1 <= N <= {MAX_K}, got {cap!r}")
            if found.group(1) in HIDDEN_FROM_CALLERS:
                raise ValueError(f"cannot cap {found.group(1)!r}: not a product field")
        return caps

    @property
    def caps(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for cap in self.max_per if (m := _CAP.match(cap))}

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
) -> list[Hit]:
    """The k products nearest to any of `vectors` (one row per query photo), each ranked by its
    nearest pair of photos: one search per row, merged. Exact whenever each search is."""
    merged: dict[str, Hit] = {}
    for vector in np.atleast_2d(vectors):
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
) -> list[Hit]:
    """The k products the query asks for: the nearest, or, with a colour (target Lab, weight) or
    active `rules`, those chosen among an over-fetched pool."""
    _check_k(k)
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise InvalidQuery("the query vector must be one-dimensional and finite")
    filters = filters or Filters()
    if colour is not None and not 0 <= colour[1] <= 1:
        raise InvalidQuery(f"colour_weight must be between 0 and 1, got {colour[1]}")
    if not rules.active and not (colour and colour[1]):
        return nearest(index, vectors, k, filters, exclude)
    pool_size = min(MAX_K, k * RERANK_POOL) if not rules.active else max(POOL_MIN, k * RULES_POOL)
    while True:
        pool = nearest(index, vectors, pool_size, filters, exclude)
        if colour and colour[1]:
            pool = rerank_by_colour(pool, colour[0], colour[1], len(pool))
        chosen = choose(index, pool, vectors, k, rules) if rules.active else pool[:k]
        if len(chosen) == k or len(pool) < pool_size or pool_size >= POOL_LIMIT:
            return chosen
        pool_size = min(POOL_LIMIT, pool_size * 4)  # caps left too few: look further


def choose(index: VectorIndex, pool: list[Hit], query: np.ndarray, k: int, rules: Rules) -> list[Hit]:
    """Up to k hits of `pool` that keep `rules`, in the pool's order (by distance, or the colour
    re-rank's).

    Caps skip a hit whose field value already has its N (a hit without the field is never capped).
    Diversity picks, each time, the hit maximising (1 - d) * relevance + d * novelty, where relevance
    is minus its distance to the query and novelty its distance to the nearest hit chosen so far (photo
    to nearest photo), both over the pool's largest distance to the query (maximal marginal relevance,
    Carbonell & Goldstein 1998; d = `rules.diversity`, 0 keeps the preference order).
    """
    caps = rules.caps
    counts: Counter[tuple[str, str]] = Counter()

    def allowed(hit: Hit) -> bool:
        return all(counts[key] < caps[key[0]] for key in _cap_keys(hit, caps))

    photos = index.vectors([h.product_id for h in pool]) if rules.diversity else {}
    scale = max((h.distance for h in pool), default=1.0) or 1.0
    novelty = np.full(len(pool), np.inf)
    remaining = list(range(len(pool)))
    chosen: list[int] = []
    while remaining and len(chosen) < k:
        candidates = [i for i in remaining if allowed(pool[i])]
        if not candidates:
            break
        pick = candidates[0]
        if rules.diversity and chosen:
            d = rules.diversity
            pick = max(candidates, key=lambda i: -(1 - d) * pool[i].distance / scale + d * novelty[i] / scale)
        hit = pool[pick]
        chosen.append(pick)
        remaining.remove(pick)
        counts.update(_cap_keys(hit, caps))
        if rules.diversity and hit.product_id in photos:
            picked = photos[hit.product_id]
            for i in remaining:
                if (other := photos.get(pool[i].product_id)) is not None:
                    novelty[i] = min(novelty[i], _nearest_photos(picked, other))
    return [pool[i] for i in sorted(chosen)]


def _cap_keys(hit: Hit, caps: dict[str, int]) -> list[tuple[str, str]]:
    """The (field, value) pairs of `hit` that caps count; lists and objects compare by their JSON."""
    return [
        (field, json.dumps(hit.payload[field], sort_keys=True, default=str))
        for field in caps
        if hit.payload.get(field) is not None
    ]


def _nearest_photos(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest Euclidean distance between a photo of `a` and a photo of `b` (photos × dim each)."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return float(np.sqrt(max(float(squared.min()), 0.0)))


def similar_to_vector(
    index: VectorIndex,
    vector: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    exclude: Sequence[str] = (),
    rules: Rules = NEAREST,
) -> list[Hit]:
    """The k products nearest to `vector` (Euclidean, to their nearest photo) that meet `filters`."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise InvalidQuery("the query vector must be one-dimensional and finite")
    return _neighbours(index, vector, k, filters, exclude, rules)


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
) -> list[Hit]:
    """The k products most like `product_id`, itself excluded, by the nearest pair of photos (all of its
    photos are queries); raises `NotFound` if it is not indexed.

    With `colour_weight` > 0, neighbours in the product's own colour are preferred (`rerank_by_colour`).
    """
    vectors, payload = indexed(index, product_id)
    if colour_weight and "colour_lab" not in payload:
        raise InvalidQuery(f"product {product_id!r} has no extracted colour: run `visrec sync` again")
    colour = (payload["colour_lab"], colour_weight) if colour_weight else None
    return _neighbours(index, vectors, k, filters, [product_id], rules, colour)


def recommend(
    index: VectorIndex,
    positive: Sequence[str],
    negative: Sequence[str] = (),
    k: int = 10,
    filters: Filters | None = None,
    rules: Rules = NEAREST,
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
    return similar_to_vector(index, target, k, filters, [*positive, *negative], rules)


def similar_to_image(
    index: VectorIndex,
    embedder: Embedder,
    image_bytes: bytes,
    limits: ImageLimits,
    k: int = 10,
    filters: Filters | None = None,
    colour_weight: float = 0.0,
    rules: Rules = NEAREST,
) -> list[Hit]:
    """The k products most like a photo (with `colour_weight` > 0, preferring its colour); raises
    `ImageError` if it cannot be decoded. A JPEG is decoded at a reduced scale that still covers the
    model's input (libjpeg's DCT scaling: half the time and a fraction of the memory of a full decode)."""
    draft = embedder.manifest.preprocess.input_size
    image = decode_image(image_bytes, limits, name="query image", draft=draft)
    vector = embedder.embed_image(image)
    colour = (extract_colours(image).lab, colour_weight) if colour_weight else None
    return _neighbours(index, vector, k, filters, (), rules, colour)
