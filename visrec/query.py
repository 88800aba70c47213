"""Queries: products similar to a product, an image or a vector, under metadata filters.

Every entry validates its input and raises `InvalidQuery`/`InvalidFilter`/`NotFound` with a reason;
the CLI and the HTTP API only parse arguments and call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from visrec.colour import extract_colours
from visrec.embed import Embedder
from visrec.errors import InvalidQuery, NotFound
from visrec.images import ImageLimits, decode_image
from visrec.index import Filters, Hit, VectorIndex

MAX_K = 1000
RERANK_POOL = 5  # a colour re-rank chooses k among k x this many visual neighbours


def indexed(index: VectorIndex, product_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A product's vector and payload; raises `NotFound` if it is not indexed."""
    found = index.get(product_id)
    if found is None:
        raise NotFound(f"product {product_id!r} is not in the index")
    return found


def similar_to_vector(
    index: VectorIndex,
    vector: np.ndarray,
    k: int = 10,
    filters: Filters | None = None,
    exclude: Sequence[str] = (),
) -> list[Hit]:
    """The k products nearest to `vector` (Euclidean) that meet `filters`."""
    if not 1 <= k <= MAX_K:
        raise InvalidQuery(f"k must be between 1 and {MAX_K}, got {k}")
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim != 1 or not np.isfinite(vector).all():
        raise InvalidQuery("the query vector must be one-dimensional and finite")
    return index.search(vector, k, filters or Filters(), exclude)


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
) -> list[Hit]:
    """The k products most like `product_id`, itself excluded; raises `NotFound` if it is not indexed.

    With `colour_weight` > 0, neighbours in the product's own colour are preferred (`rerank_by_colour`).
    """
    vector, payload = indexed(index, product_id)
    if not colour_weight:
        return similar_to_vector(index, vector, k, filters, exclude=[product_id])
    if "colour_lab" not in payload:
        raise InvalidQuery(f"product {product_id!r} has no extracted colour: run `visrec sync` again")
    pool = similar_to_vector(index, vector, min(MAX_K, k * RERANK_POOL), filters, exclude=[product_id])
    return rerank_by_colour(pool, payload["colour_lab"], colour_weight, k)


def recommend(
    index: VectorIndex,
    positive: Sequence[str],
    negative: Sequence[str] = (),
    k: int = 10,
    filters: Filters | None = None,
) -> list[Hit]:
    """Products like the `positive` ones and unlike the `negative` ones (e.g. a basket, skipped items).

    Qdrant's `average_vector` strategy: the target is avg(positive) + (avg(positive) - avg(negative)).
    It is computed here so both backends answer alike (qdrant-edge has no such strategy) and
    distances stay Euclidean. The example products are excluded. Raises `NotFound` for an unknown id.
    """
    if not positive:
        raise InvalidQuery("recommend needs at least one positive product id")

    def mean_of(ids: Sequence[str]) -> np.ndarray:
        return np.mean([indexed(index, product_id)[0] for product_id in ids], axis=0)

    target = mean_of(positive)
    if negative:
        target = 2 * target - mean_of(negative)
    return similar_to_vector(index, target, k, filters, exclude=[*positive, *negative])


def similar_to_image(
    index: VectorIndex,
    embedder: Embedder,
    image_bytes: bytes,
    limits: ImageLimits,
    k: int = 10,
    filters: Filters | None = None,
    colour_weight: float = 0.0,
) -> list[Hit]:
    """The k products most like a photo (with `colour_weight` > 0, preferring its colour); raises
    `ImageError` if it cannot be decoded. A JPEG is decoded at a reduced scale that still covers the
    model's input (libjpeg's DCT scaling: half the time and a fraction of the memory of a full decode)."""
    draft = embedder.manifest.preprocess.input_size
    image = decode_image(image_bytes, limits, name="query image", draft=draft)
    vector = embedder.embed_image(image)
    if not colour_weight:
        return similar_to_vector(index, vector, k, filters)
    pool = similar_to_vector(index, vector, min(MAX_K, k * RERANK_POOL), filters)
    return rerank_by_colour(pool, extract_colours(image).lab, colour_weight, k)
