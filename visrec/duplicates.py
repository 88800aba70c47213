"""Near-duplicate products: distinct products whose photos are near-identical (one photo re-used for two
SKUs, a re-encoded or resized upload).

The index answers it, never all pairs: each product's photos are searched for their `neighbours` nearest
other products, the ones within `max_distance` are linked, and linked products are joined into groups
(union-find). Cost: one bounded search per photo, so time grows with the catalogue like that many queries.
`docs/duplicates.md` gives the calibration of the default distance and the time at 100k products.

A group is transitive: if A is within the distance of B and B of C, A, B and C form one group even when A
and C are farther apart; each group lists the links that joined it, with their distances.

Colour (`colours_agree`, the one place for the rule): the embedding is trained on categories and barely
sees colour, so a red and a pink shoe of one shape lie as close as a re-encode of one photo. A pair within
the distance is linked only if the two photos' dominant colours (CIE Lab, `colour_lab`, extracted by sync)
also lie within `max_colour_delta_e` (CIE76 Delta E). Sync extracts colour from a product's first photo
only, so a pair is checked when both matched photos are first photos holding colour data; any other pair
(a product's second photo, a point written before colour extraction) is linked on distance alone, as
before the check existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visrec.config import DuplicateSettings
from visrec.errors import InvalidQuery
from visrec.filters import Filters
from visrec.index import VectorIndex
from visrec.rules import MAX_K

PAGE = 1000  # products fetched per browse call
NORM_SAMPLE = 500  # products whose vectors' lengths set the scale of a relative distance

Progress = Callable[[int, int], None]


def photo_lab(payload: dict[str, Any], photo: int) -> tuple[float, float, float] | None:
    """The CIE Lab colour of the product's photo number `photo` where the payload holds it: sync extracts
    `colour_lab` from the first photo only. None for another photo or a payload without (or with a bad)
    colour."""
    lab = payload.get("colour_lab")
    if photo != 0 or not isinstance(lab, list | tuple) or len(lab) != 3:
        return None
    try:
        values = tuple(float(v) for v in lab)
    except (TypeError, ValueError):
        return None
    return (values[0], values[1], values[2]) if all(math.isfinite(v) for v in values) else None


def colour_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """CIE76 Delta E between two Lab colours (as `visrec.colour` reports them)."""
    return math.dist(a, b)


def colours_agree(
    a: dict[str, Any], a_photo: int, b: dict[str, Any], b_photo: int, max_delta_e: float | None
) -> bool:
    """Whether photo `a_photo` of the product with payload `a` and photo `b_photo` of `b` agree in colour:
    their dominant colours within `max_delta_e` (CIE76). True when the rule is off (None) or either photo's
    colour is unknown (`photo_lab`): then the vector distance alone decides, as before colour was checked."""
    if max_delta_e is None:
        return True
    lab_a, lab_b = photo_lab(a, a_photo), photo_lab(b, b_photo)
    if lab_a is None or lab_b is None:
        return True
    return colour_distance(lab_a, lab_b) <= max_delta_e


@dataclass(frozen=True)
class Link:
    """A photo of product `a` and one of product `b` (a < b) lie `distance` apart, within the limit."""

    a: str
    b: str
    distance: float

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "distance": self.distance}


@dataclass
class DuplicateGroup:
    """Distinct products joined by links within the distance; products sorted by id, links nearest first."""

    products: list[tuple[str, dict[str, Any]]]
    links: list[Link]

    @property
    def closest(self) -> float:
        return min(link.distance for link in self.links)

    @property
    def product_ids(self) -> list[str]:
        return [product_id for product_id, _ in self.products]

    def to_dict(self, shown: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return {
            "products": [{"product_id": pid, "payload": shown(payload)} for pid, payload in self.products],
            "links": [link.to_dict() for link in self.links],
            "closest": self.closest,
        }


@dataclass
class DuplicateScan:
    """The groups found, and what the scan did to find them."""

    max_distance: float
    neighbours: int
    max_colour_delta_e: float | None = None
    products: int = 0  # products scanned
    photos: int = 0  # searches made (one per photo)
    groups: list[DuplicateGroup] = field(default_factory=list)
    # Products whose every one of `neighbours` hits lay within the distance: more may be there unseen
    # (they are still grouped through their neighbours' own searches; raise `neighbours` to be sure).
    saturated: list[str] = field(default_factory=list)
    # Pairs of products within the distance left unlinked because their photos' colours differ
    # (`colours_agree`): colour variants.
    colour_rejected: int = 0

    def to_dict(self, shown: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return {
            "max_distance": self.max_distance,
            "neighbours": self.neighbours,
            "max_colour_delta_e": self.max_colour_delta_e,
            "colour_rejected": self.colour_rejected,
            "products_scanned": self.products,
            "photos_searched": self.photos,
            "groups": [group.to_dict(shown) for group in self.groups],
            "saturated": self.saturated,
        }


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = self.parent.setdefault(x, x)
        while root != self.parent[root]:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def check_options(max_distance: float, neighbours: int, max_colour_delta_e: float | None = None) -> None:
    """Raises `InvalidQuery` for a negative or non-finite distance or colour difference, or neighbours
    outside 1..MAX_K."""
    if not math.isfinite(max_distance) or max_distance < 0:
        raise InvalidQuery(f"max distance must be a finite number ≥ 0, got {max_distance}")
    if max_colour_delta_e is not None and not (math.isfinite(max_colour_delta_e) and max_colour_delta_e >= 0):
        raise InvalidQuery(f"max colour Delta E must be a finite number ≥ 0, got {max_colour_delta_e}")
    if not 1 <= neighbours <= MAX_K:
        raise InvalidQuery(f"neighbours must be between 1 and {MAX_K}, got {neighbours}")


def median_norm(index: VectorIndex, sample: int = NORM_SAMPLE) -> float:
    """The median length of the vectors of the first `sample` products in point-id order (ids are hashes,
    so that is a spread sample): the scale of the model's embedding, whatever the catalogue's size."""
    page, _ = index.browse(Filters(), sample)
    found = index.vectors([product_id for product_id, _ in page])  # one read for the whole sample
    norms = [float(n) for vectors in found.values() for n in np.linalg.norm(vectors, axis=1)]
    return float(np.median(norms)) if norms else 0.0


def relative_distance(index: VectorIndex, share: float) -> tuple[float, float]:
    """(`share` x the median vector length, that median): the default `max_distance`."""
    if not math.isfinite(share) or share < 0:
        raise InvalidQuery(f"the relative distance must be a finite number ≥ 0, got {share}")
    norm = median_norm(index)
    return share * norm, norm


def scan_with(
    index: VectorIndex, settings: DuplicateSettings, progress: Progress | None = None
) -> tuple[DuplicateScan, dict[str, float]]:
    """`find_duplicates` at the settings' distance: `max_distance` when set, else `max_relative` x the
    median vector length, returned with that scale ({} for an absolute distance). `find_duplicates` checks
    the options."""
    colour = settings.max_colour_delta_e
    if settings.max_distance is not None:
        return find_duplicates(index, settings.max_distance, settings.neighbours, progress, colour), {}
    distance, norm = relative_distance(index, settings.max_relative)
    scale = {"max_relative": settings.max_relative, "median_norm": norm}
    return find_duplicates(index, distance, settings.neighbours, progress, colour), scale


def find_duplicates(
    index: VectorIndex,
    max_distance: float,
    neighbours: int = 10,
    progress: Progress | None = None,
    max_colour_delta_e: float | None = None,
) -> DuplicateScan:
    """Groups of distinct products with a photo within `max_distance` (Euclidean) of another's, nearest
    group first; each product's photos are searched for their `neighbours` nearest other products. With
    `max_colour_delta_e`, a pair within the distance is linked only if its photos' colours agree
    (`colours_agree`; None: distance alone).

    Each page of products is read with one call for its vectors (a row per photo). Raises
    `InvalidQuery` for bad options.
    """
    check_options(max_distance, neighbours, max_colour_delta_e)
    scan = DuplicateScan(max_distance, neighbours, max_colour_delta_e)
    total = index.count()
    best: dict[tuple[str, str], Link] = {}
    rejected: set[tuple[str, str]] = set()  # pairs within the distance whose photos' colours differ
    payloads: dict[str, dict[str, Any]] = {}
    after: str | None = None
    while True:
        page, after = index.browse(Filters(), PAGE, after)
        found = index.vectors([product_id for product_id, _ in page])
        for product_id, payload in page:
            if product_id not in found:  # deleted since the page was read
                continue
            scan.products += 1
            linked = False
            for photo, vector in enumerate(found[product_id]):
                scan.photos += 1
                hits = index.search(vector, neighbours, Filters(), exclude=[product_id])
                near = [hit for hit in hits if hit.distance <= max_distance and hit.product_id != product_id]
                if near and len(near) == len(hits) == neighbours:
                    scan.saturated.append(product_id)
                for hit in near:
                    if not colours_agree(payload, photo, hit.payload, hit.matched, max_colour_delta_e):
                        rejected.add((min(product_id, hit.product_id), max(product_id, hit.product_id)))
                        continue
                    linked = True
                    payloads.setdefault(hit.product_id, hit.payload)
                    a, b = sorted((product_id, hit.product_id))
                    if (a, b) not in best or hit.distance < best[a, b].distance:
                        best[a, b] = Link(a, b, hit.distance)
            if linked:
                payloads[product_id] = payload
            if progress:
                progress(scan.products, total)
        if after is None:
            break
    scan.colour_rejected = len(rejected - best.keys())  # not linked through another pair of photos either
    scan.groups = _groups(best.values(), payloads)
    scan.saturated = sorted(set(scan.saturated))
    return scan


def _groups(links: Iterable[Link], payloads: dict[str, dict[str, Any]]) -> list[DuplicateGroup]:
    links = list(links)
    joined = _UnionFind()
    for link in links:
        joined.union(link.a, link.b)
    members: dict[str, list[str]] = {}
    for product_id in payloads:
        members.setdefault(joined.find(product_id), []).append(product_id)
    by_root: dict[str, list[Link]] = {}
    for link in links:
        by_root.setdefault(joined.find(link.a), []).append(link)
    groups = [
        DuplicateGroup(
            [(pid, payloads[pid]) for pid in sorted(members[root])],
            sorted(group_links, key=lambda link: (link.distance, link.a, link.b)),
        )
        for root, group_links in by_root.items()
    ]
    return sorted(groups, key=lambda g: (g.closest, g.product_ids[0]))
