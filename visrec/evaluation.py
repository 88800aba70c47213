"""The quality gate of a model upgrade: how well a collection version retrieves products of the query's
own category (P@10 and mAP@10, `visrec.metrics`), measured through that version's own index on query
products both versions hold, and the rule that decides whether the new version may replace the live one.

The query products are, where both models' manifests list the products held out of their training
(`artefact.HELDOUT_PRODUCTS`), those neither model was trained on; otherwise a seeded sample of the
indexed products. Products without a category are never queries. Each query's neighbours are
`query.similar_to_product`'s (the product itself excluded); a neighbour is relevant when its category is
the query's, and mAP@10 divides by min(10, the other products of that category in the version).

A version's figures are recorded in its collection metadata (`QUALITY`, JSON), with the model they
measured, so `visrec status` and `/readyz` can show them.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

from visrec.filters import Filters
from visrec.index import VectorIndex
from visrec.manifest import HELDOUT_PRODUCTS, Manifest
from visrec.metrics import average_precision_at_k, precision_at_k, relevance

K = 10
QUALITY = "quality"  # the collection metadata entry holding the figures (JSON)
# Held-out products are used only when there are at least this many of them (or the sample size, if
# smaller); fewer would make the figures noise.
MIN_HELDOUT_QUERIES = 100
PAGE = 1000

QueryKind = Literal["held-out", "sample"]


@dataclass(frozen=True)
class QuerySet:
    """The query products (id → category) and where they come from."""

    kind: QueryKind
    products: dict[str, str]
    drawn_from: int  # how many candidates they were drawn from
    seed: int

    def describe(self) -> str:
        if self.kind == "held-out":
            return (
                f"{len(self.products)} of the {self.drawn_from} indexed products no model measured was "
                "trained on (the manifests' held-out products)"
            )
        return (
            f"a sample of {len(self.products)} of the {self.drawn_from} indexed products (seed {self.seed})"
        )


@dataclass(frozen=True)
class Quality:
    """A version's same-category retrieval figures on a query set."""

    model_version: str
    p_at_10: float
    map_at_10: float
    queries: int
    query_set: QueryKind
    measured_at: str  # ISO 8601, UTC
    seconds: float

    def figures(self) -> dict[str, float]:
        return {f"p@{K}": self.p_at_10, f"map@{K}": self.map_at_10}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            **{name: round(value, 4) for name, value in self.figures().items()},
            "queries": self.queries,
            "query_set": self.query_set,
            "measured_at": self.measured_at,
            "seconds": round(self.seconds, 2),
        }

    def line(self) -> str:
        return f"p@{K} {self.p_at_10:.4f}, map@{K} {self.map_at_10:.4f}"


def categories(index: VectorIndex) -> dict[str, str]:
    """product id → category of every indexed product that has one (one page-wise read of payloads)."""
    found: dict[str, str] = {}
    after: str | None = None
    while True:
        page, after = index.browse(Filters(), PAGE, after)
        for product_id, payload in page:
            category = payload.get("category")
            if isinstance(category, str) and category:
                found[product_id] = category
        if after is None:
            return found


def heldout_products(manifest: Manifest) -> set[str] | None:
    """The products the manifest's model was never trained on, or None when the manifest does not say
    (artefacts exported before it was recorded)."""
    listed = manifest.training.get(HELDOUT_PRODUCTS)
    return {str(p) for p in listed} if isinstance(listed, list) else None


def choose_queries(
    live: dict[str, str],
    new: dict[str, str],
    untrained: set[str] | None,
    size: int,
    seed: int,
) -> QuerySet:
    """Up to `size` query products, each in both versions with the same category: those in `untrained`
    (products neither model was trained on) when there are enough, else any; a seeded sample of them."""
    candidates = sorted(p for p, category in new.items() if live.get(p) == category)
    pool: list[str] = candidates
    kind: QueryKind = "sample"
    if untrained is not None:
        held = [p for p in candidates if p in untrained]
        if held and len(held) >= min(size, MIN_HELDOUT_QUERIES):
            pool, kind = held, "held-out"
    chosen = pool if len(pool) <= size else sorted(random.Random(seed).sample(pool, size))
    return QuerySet(kind, {p: new[p] for p in chosen}, len(pool), seed)


def measure(index: VectorIndex, model_version: str, queries: QuerySet, gallery: dict[str, str]) -> Quality:
    """P@10 and mAP@10 of `index` for the query products; `gallery` is every indexed product's category
    (for mAP's count of relevant products). A query with fewer than 10 neighbours (a small collection)
    counts the missing ones as not relevant."""
    from visrec import query  # torch, for query photos: loaded by a gate, not by every command

    started = time.perf_counter()
    ids = list(queries.products)
    labels = np.empty((len(ids), K), dtype=object)  # None: no neighbour there
    for row, product_id in enumerate(ids):
        hits = query.similar_to_product(index, product_id, k=K)
        for col, hit in enumerate(hits[:K]):
            labels[row, col] = hit.payload.get("category")
    query_labels = np.array([queries.products[p] for p in ids], dtype=object)
    relevant = relevance(labels, query_labels)
    per_category = Counter(gallery.values())
    others = np.array([per_category[c] - 1 for c in query_labels], dtype=np.int64)
    return Quality(
        model_version=model_version,
        p_at_10=precision_at_k(relevant, K) if ids else 0.0,
        map_at_10=average_precision_at_k(relevant, K, others) if ids else 0.0,
        queries=len(ids),
        query_set=queries.kind,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
    )


def worse_by(new: Quality, live: Quality) -> float:
    """How much lower the new version's worse figure is than the live one's (negative: better on both)."""
    return max(live.p_at_10 - new.p_at_10, live.map_at_10 - new.map_at_10)


def record(index: VectorIndex, dim: int, quality: Quality, compared_with: Quality | None = None) -> None:
    """Write `quality` (and the figures of the version it was compared with, on the same queries) into
    the collection's metadata, keeping what is there."""
    entry: dict[str, Any] = quality.to_dict()
    if compared_with is not None:
        entry["compared_with"] = {
            "model_version": compared_with.model_version,
            **{name: round(value, 4) for name, value in compared_with.figures().items()},
        }
    index.create(dim, {**index.metadata(), QUALITY: json.dumps(entry)})


def recorded(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The figures recorded in a collection's metadata, if they measured the model that built it now
    (a version rebuilt in place with another model keeps no stale figures); None otherwise."""
    try:
        entry = json.loads(metadata[QUALITY])
    except (KeyError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("model_version") != metadata.get("model_version"):
        return None
    return entry
