"""Every product's neighbours (`visrec neighbours`): the lists `visrec similar ID` gives, for a whole
catalogue, computed a batch of products at a time.

A product's list is `query.similar_to_product`'s under the same filters and rules (itself excluded,
nearest photo first, ties by product id), plus `same` fields: a neighbour must hold the product's own
value of each (a product without one, or with a list or an object there, gets an empty list). Filters
choose the products listed as well as their neighbours. A batch's searches (one per product photo) go
to the engine in one call (`VectorIndex.search_batch`); the rules then choose per product, as a single
query does (`query.chosen`). Memory is a batch's vectors and pools, whatever the catalogue's size.

`visrec.feed` writes the lists and keeps what a later delta needs; `visrec.feed_delta` works out which
lists a change can reach.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

import numpy as np

from visrec import query
from visrec.class_matrix import ClassMatrix, Photos
from visrec.errors import InvalidQuery, NoMatch, closest
from visrec.filters import Filters
from visrec.index import Hit, SearchRequest, VectorIndex
from visrec.index.points import payload_key
from visrec.matches import check_matches, check_scored
from visrec.payload import HIDDEN_FROM_OPERATORS, addressable
from visrec.rules import MAX_K, Rules

BATCH = 256  # products whose searches go to the engine in one call
# A nearest-first list is searched RESERVE x k deep and that many kept in the state: a delta then mends a
# list whose neighbours moved away from those left, without a search, while k of them remain.
RESERVE = 2
MAX_SAME = 5  # --same fields
# Classes read whole, the largest first, where a `--same` field is not filtered through a payload index:
# each read is then a scan of the store, so many small classes (a `--same title`) go to the engine.
# Where every `--same` field is, each read costs what it finds, and every class is read whole.
CLASSES_READ = 64
# What a search hands back of each neighbour: its id, its photos (which one matched) and what the rules read.
HIT_FIELDS = ("product_id", "image", "images")

SameValue = str | bool | int | float
ClassKey = tuple[tuple[str, SameValue], ...]  # what a class's filters compare of its values (`match_key`)


@dataclass(frozen=True)
class FeedRules:
    """What decides each product's list (the options of `visrec neighbours`, checked by `check`)."""

    k: int = 20
    filters: Filters = field(default_factory=Filters)
    rules: Rules = query.NEAREST
    colour_weight: float = 0.0
    same: tuple[str, ...] = ()
    exact: bool = False  # a full scan per search: the ground truth, for checks (slow)

    def check(self) -> None:
        """Raises `InvalidQuery` for a k out of range, a bad colour weight or a `same` field no engine
        can address."""
        if not 1 <= self.k <= MAX_K:
            raise InvalidQuery(f"k must be between 1 and {MAX_K}, got {self.k}")
        if not 0 <= self.colour_weight <= 1 or math.isnan(self.colour_weight):
            raise InvalidQuery(f"colour_weight must be between 0 and 1, got {self.colour_weight}")
        if len(self.same) > MAX_SAME:
            raise InvalidQuery(f"at most {MAX_SAME} --same fields, got {len(self.same)}")
        for name in self.same:
            if not name or "=" in name or not addressable(name) or name in HIDDEN_FROM_OPERATORS:
                raise InvalidQuery(f"--same takes a product field, got {name!r}")

    def describe(self) -> dict[str, Any]:
        """The options as data: what a previous feed must have been made with for a delta on it (the
        shop's rules only where given: a feed made before they existed stays comparable)."""
        rules = self.rules
        shop = {"exclude": sorted(set(rules.exclude)), "boost": rules.boost, "decay": rules.decay}
        return {
            "k": self.k,
            "filters": self.filters.model_dump(include=set(Filters.model_fields) - {"where_kinds"}),
            "diversity": rules.diversity,
            "max_per": sorted(rules.max_per),
            "colour_weight": self.colour_weight,
            "same": sorted(self.same),
            **{name: value for name, value in shop.items() if value},
        }

    @property
    def ranks_by_more_than_distance(self) -> bool:
        return bool(self.colour_weight)

    def hit_fields(self) -> list[str]:
        """The payload fields a neighbour's hit must carry: its id, its photos and what the rules read."""
        read = [*self.rules.read_fields, *(["colour_lab"] if self.colour_weight else [])]
        return list(dict.fromkeys([*HIT_FIELDS, *read]))

    def listed_fields(self) -> list[str]:
        """The payload fields read of each product listed."""
        return list(
            dict.fromkeys(
                [
                    *HIT_FIELDS,
                    "vectors_hash",
                    "model_version",
                    *self.same,
                    *(["colour_lab"] * bool(self.colour_weight)),
                ]
            )
        )


def check_against(index: VectorIndex, feed: FeedRules) -> None:
    """Raise `NoMatch` for a filter that no product meets alone (`matches.check_matches`) or a `same`
    field no product holds, before any list is computed."""
    feed.check()
    check_matches(index, feed.filters, [])
    check_scored(index, feed.rules.boosts, feed.rules.decays)
    known = index.field_kinds()
    for name in feed.same:
        if name not in known and not index.count(Filters(numbers_in=[name])):
            guess = closest(name, [f for f in known if f not in HIDDEN_FROM_OPERATORS])
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise NoMatch(f"no product has a field {name!r} for --same{hint}")


def same_key(payload: dict[str, Any], same: Sequence[str]) -> tuple[SameValue, ...] | None:
    """The product's values of the `same` fields, or None if it lacks one (or holds a list, an object
    or a number that is not finite there): then it gets an empty list. () without `same` fields."""
    values: list[SameValue] = []
    for name in same:
        value = payload.get(name)
        if not _is_same_value(value):
            return None
        values.append(value)
    return tuple(values)


def listed_by(payload: dict[str, Any], same: Sequence[str]) -> tuple[tuple[SameValue, ...], ...] | None:
    """Each `same` field's values by which other classes' lists hold a product that has no class of its
    own (`same_key` is None) because a field holds a list: a class's filter matches a list holding its
    value (the list's own elements: not a nested list's). None where the product has a class, or lies
    in none (a field missing, or holding no such value)."""
    if not same or same_key(payload, same) is not None:
        return None
    fields: list[tuple[SameValue, ...]] = []
    for name in same:
        value = payload.get(name)
        values = tuple(v for v in (value if isinstance(value, list) else [value]) if _is_same_value(v))
        if not values:
            return None
        fields.append(values)
    return tuple(fields)


def match_key(key: Sequence[SameValue]) -> ClassKey:
    """What a class's filters compare of its `same` values: the class itself. 1, 1.0 and -0.0 against
    0 are one number each (`with_same` asks a number's range, as a float), True is no number."""
    return tuple(map(_matched, key))


def classes_listing(values: Sequence[Sequence[SameValue]], known: Collection[ClassKey]) -> list[ClassKey]:
    """Those of the classes `known` whose filters match a product of `listed_by` `values`."""
    options = [{_matched(value) for value in field} for field in values]
    if math.prod(len(o) for o in options) <= len(known):
        return [c for c in itertools.product(*options) if c in known]
    return [c for c in known if all(m in o for m, o in zip(c, options, strict=True))]


def _matched(value: SameValue) -> tuple[str, SameValue]:
    if isinstance(value, bool | str):
        return ("bool" if isinstance(value, bool) else "text", value)
    return ("number", _number(value))


def _number(value: float) -> float:
    """A number as a class's filter compares it: a float (2**53 + 1 is 2**53 to the engine), -0.0 as 0.0."""
    return float(value) + 0.0


def _is_same_value(value: Any) -> TypeGuard[SameValue]:
    if isinstance(value, str | bool):
        return True
    try:
        return isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:  # an integer past any float: no filter asks for it
        return False


def with_same(filters: Filters, same: Sequence[str], key: Sequence[SameValue]) -> Filters:
    """`filters` and: each `same` field holds the value in `key` (text and booleans matched exactly, a
    number as a number, integer or not)."""
    if not same:
        return filters
    equals = dict(filters.equals)
    where = list(filters.where)
    for name, value in zip(same, key, strict=True):
        if isinstance(value, str | bool):
            equals[name] = value
        else:  # spelled one way for every spelling of the number: one class, one filter
            number = _number(value)
            where.append(f"{name}={number!r}..{number!r}")
    return filters.model_copy(update={"equals": equals, "where": where})


def fingerprint(payload: dict[str, Any], vectors: np.ndarray | None) -> str:
    """What says a product's vectors changed: the vectors hash sync records (its photos and payload
    version, under the model that embedded them), else a hash of the vectors themselves."""
    recorded = payload.get("vectors_hash")
    if recorded:
        return f"{payload.get('model_version', '')}:{recorded}"
    data = b"" if vectors is None else np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
    return "vectors:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Listed:
    """One product's list, and what a later delta needs of it: `kept`, its nearest products beyond the
    list too (`RESERVE` x k, nearest-first lists only), complete up to `within`: every product of its
    class at most that far is in `kept` (None: all of the class is; -1: it has no class, nothing can
    enter)."""

    product_id: str
    hits: list[Hit]
    fingerprint: str
    key: tuple[SameValue, ...] | None  # its `same` values (None: it has none, its list is empty)
    kept: Sequence[Sequence[Any]]  # (product id, distance, photo) of its nearest, nearest first
    within: float | None
    uncoloured: bool = False  # a colour re-rank was asked, and the product has no colour: not re-ranked
    listed_by: tuple[tuple[SameValue, ...], ...] | None = None  # with no class: the classes holding it


class Searcher(Protocol):
    """What answers a batch's searches: the engine (`VectorIndex`) or a class held in memory
    (`ClassMatrix`)."""

    def vectors(self, product_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def search_batch(self, requests: Sequence[SearchRequest], exact: bool = False) -> list[list[Hit]]: ...


def lists_for(
    index: VectorIndex,
    products: Sequence[tuple[str, dict[str, Any]]],
    feed: FeedRules,
    bounds: query.Bounds = query.BOUNDS,
    searcher: Searcher | None = None,
) -> list[Listed]:
    """The lists of `products` ((id, payload) pairs; the indexed ones: one gone meanwhile is left out):
    every search of the batch in one call of `searcher` (the engine by default), then each product's
    rules."""
    searcher = searcher or index
    vectors = searcher.vectors([product_id for product_id, _ in products])
    plans: list[tuple[str, dict[str, Any], np.ndarray, Filters | None, int]] = []
    requests: list[SearchRequest] = []
    fields = feed.hit_fields()
    for product_id, payload in products:
        if product_id not in vectors:
            continue
        rows = np.atleast_2d(vectors[product_id])
        key = same_key(payload, feed.same)
        if key is None:
            plans.append((product_id, payload, rows, None, 0))
            continue
        filters = with_same(feed.filters, feed.same, key)
        size = _depth(feed, len(rows), _weight(feed, payload), bounds)
        searched = query.query_rows(rows, size, bounds)
        plans.append((product_id, payload, rows, filters, len(searched)))
        fetched = query.fetch_depth(size)
        exclude = [product_id, *feed.rules.exclude]
        requests += [SearchRequest(row, fetched, filters, exclude, fields) for row in searched]
    found = iter(searcher.search_batch(requests, exact=feed.exact))
    listed = []
    for product_id, payload, rows, among, searches in plans:
        key = same_key(payload, feed.same)
        uncoloured = bool(feed.colour_weight) and "colour_lab" not in payload
        if among is None:
            held_by = listed_by(payload, feed.same)
            listed.append(
                Listed(product_id, [], fingerprint(payload, rows), key, [], -1.0, uncoloured, held_by)
            )
            continue
        depth = _depth(feed, len(rows), _weight(feed, payload), bounds)
        again = _search_again(
            searcher, query.query_rows(rows, depth, bounds), among, product_id, fields, feed
        )
        pool = query.cut_at_k([next(found) for _ in range(searches)], depth, again)
        hits = _choose(index, feed, payload, rows, among, pool, bounds)
        within = pool[-1].distance if len(pool) >= depth else None
        kept = [(h.product_id, h.distance, h.matched) for h in pool]
        listed.append(Listed(product_id, hits, fingerprint(payload, rows), key, kept, within, uncoloured))
    return listed


def _search_again(
    searcher: Searcher,
    rows: np.ndarray,
    filters: Filters,
    product_id: str,
    fields: list[str],
    feed: FeedRules,
) -> Callable[[int, int], list[Hit]]:
    """A product's search (by its row) again, n deep: where ties reach the cut (`query.cut_at_k`)."""

    def search(row: int, n: int) -> list[Hit]:
        request = SearchRequest(rows[row], n, filters, [product_id, *feed.rules.exclude], fields)
        return searcher.search_batch([request], exact=feed.exact)[0]

    return search


def _depth(feed: FeedRules, photos: int, weight: float, bounds: query.Bounds) -> int:
    """How many neighbours a product's searches fetch: the rules' pool, or a nearest-first list's
    reserve."""
    if feed.rules.active or weight:
        return query.pool_sizes(feed.k, photos, feed.rules, weight, bounds)[0]
    return min(MAX_K, RESERVE * feed.k)


def _weight(feed: FeedRules, payload: dict[str, Any]) -> float:
    """The colour re-rank's weight for this product: none for one without an extracted colour (`similar`
    refuses it; a feed lists it by the visual order alone, and counts it)."""
    return feed.colour_weight if "colour_lab" in payload else 0.0


def _choose(
    index: VectorIndex,
    feed: FeedRules,
    payload: dict[str, Any],
    rows: np.ndarray,
    filters: Filters,
    pool: list[Hit],
    bounds: query.Bounds,
) -> list[Hit]:
    weight = _weight(feed, payload)
    if not feed.rules.active and not weight:
        return pool[: feed.k]
    colour = (payload["colour_lab"], weight) if weight else None
    exclude = [str(payload["product_id"]), *feed.rules.exclude]
    return query.chosen(
        index, rows, feed.k, filters, exclude, feed.rules, colour, bounds, pool=pool, exact=feed.exact
    )


def batches(
    index: VectorIndex,
    feed: FeedRules,
    size: int = BATCH,
    photos: Photos | None = None,
    *,
    limit: int | None,
) -> Iterator[tuple[list[tuple[str, dict[str, Any]]], Searcher]]:
    """The products the filters choose, (id, payload) a batch at a time, each with what searches it,
    every product once: those without `same` values (no search), then the classes read whole
    (`classes_read`: the `limit` largest) into memory one after the other (`ClassMatrix`: exact, and
    far cheaper a product than the engine; a class over its memory budget is left), then the rest, in
    point-id order, through the engine. The classes read their photos from `photos` (the engine's by
    default)."""
    sizes: Counter[ClassKey] = Counter()
    listed: set[str] = set()  # a product whose class changes meanwhile is listed once, in the first
    for batch in _scrolled(index, feed, size):
        keyless = [(p, payload) for p, payload in batch if same_key(payload, feed.same) is None]
        if keyless:
            listed.update(p for p, _ in keyless)
            yield keyless, index
        sizes.update(c for _, payload in batch if (c := class_of(payload, feed.same)) is not None)
    fields = list(dict.fromkeys([*feed.listed_fields(), *feed.hit_fields()]))
    held: set[ClassKey] = set()
    for known in classes_read(sizes, limit):
        matrix = ClassMatrix.load(index, class_filters(feed, known), fields, photos=photos)
        if matrix is None:
            continue
        held.add(known)
        members = [
            (p, payload)
            for p, payload in zip(matrix.ids, matrix.payloads, strict=True)
            if class_of(payload, feed.same) == known and p not in listed
        ]
        listed.update(p for p, _ in members)
        for begin in range(0, len(members), size):
            yield members[begin : begin + size], matrix
    if held == set(sizes):
        return
    for batch in _scrolled(index, feed, size):
        rest = [
            (p, payload)
            for p, payload in batch
            if (c := class_of(payload, feed.same)) is not None and c not in held and p not in listed
        ]
        if rest:
            yield rest, index


def read_limit(index: VectorIndex, feed: FeedRules) -> int | None:
    """How many classes a feed reads whole: all (None) where the engine filters every `--same` field
    through a payload index, else the `CLASSES_READ` largest. A feed's state records it (a delta
    knows which classes the previous feed read)."""
    return None if all(index.filtered_by_index(name) for name in feed.same) else CLASSES_READ


def classes_read(sizes: Counter[ClassKey], limit: int | None) -> list[ClassKey]:
    """The classes a feed reads whole, by their sizes: those of two products or more, the `limit`
    largest (`read_limit`; equal sizes by their values). A delta reads the same ones, to search in
    the arithmetic of the full feed it mends."""
    ranked = sorted((-count, known) for known, count in sizes.items() if count > 1)
    return [known for _, known in ranked[:limit]]


def class_filters(feed: FeedRules, known: ClassKey) -> Filters:
    """The filters whose searches a class answers: the feed's and its `same` values."""
    return with_same(feed.filters, feed.same, tuple(value for _, value in known))


def class_of(payload: dict[str, Any], same: Sequence[str]) -> ClassKey | None:
    """A product's class by its `same` values as the engine's filters compare them (True and 1 are two,
    1 and 1.0 one: `match_key`), or None where it has none."""
    key = same_key(payload, same)
    return None if key is None else match_key(key)


def _scrolled(index: VectorIndex, feed: FeedRules, size: int) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The products the filters choose, (id, payload) a batch at a time, in point-id order."""
    batch: list[tuple[str, dict[str, Any]]] = []
    fields = [payload_key(name) for name in feed.listed_fields()]  # quoted: a field may hold a space
    for payload in index.all_payloads(feed.filters, fields):
        batch.append((str(payload["product_id"]), payload))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
