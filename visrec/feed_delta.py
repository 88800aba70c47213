"""A neighbours feed's delta (`--since PREVIOUS`): it reads the previous feed's state and the store's
bookkeeping now (no vectors), and recomputes only the lists a change can reach:

- a product new to the feed, gone from it, whose vectors changed (its vectors hash) or whose `same`
  values changed (a list's too) is *moved*; its own list is recomputed (a gone one is written as
  deleted);
- a list holding a moved or gone product is recomputed;
- a list a moved product may now enter: the moved product's surroundings are searched within its class
  (the filters, and its `same` values; with a list there, within each class whose filter matches it,
  `neighbours.listed_by`), further and further until past the farthest k-th distance of that class's
  lists; each list found whose own k-th distance is not below the moved product's distance to it (or
  that is short of k) is recomputed.

Every other list cannot have changed: its k neighbours are unchanged and nothing new came closer than
its k-th. A change of a field no rule reads (a price, with no price filter) moves nothing. The delta
holds the lines of the lists that differ now, `deleted` lines for products gone, and the full state
beside it (previous feed + delta == a full feed now). Only nearest-first lists are tracked: a delta
refuses `--diversity`, `--max-per`, `--colour-weight`, `--boost` and `--decay`, whose pools a change
reaches further (and a decay's order moves with the clock alone). `--exclude` is kept: its ids are
left out of every search, the previous feed's as this one's (a delta needs the same list).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visrec import query
from visrec.class_matrix import Classes
from visrec.errors import Refused
from visrec.feed import (
    FeedWriter,
    Format,
    Progress,
    StateFile,
    StateWriter,
    Written,
    read_state,
    recorded_fingerprint,
    state_header,
    tell,
    write_feed,
)
from visrec.feed_vectors import KeptVectors, Photos, kept_vectors, vectors_path
from visrec.index import Hit, SearchRequest, VectorIndex
from visrec.index.points import payload_key
from visrec.neighbours import (
    BATCH,
    CLASSES_READ,
    HIT_FIELDS,
    RESERVE,
    ClassKey,
    FeedRules,
    Listed,
    SameValue,
    class_filters,
    classes_listing,
    classes_read,
    fingerprint,
    listed_by,
    lists_for,
    match_key,
    read_limit,
    same_key,
)
from visrec.payload import photos
from visrec.rules import MAX_K

REACH_START = 4  # a moved product's first search around it fetches this many times k


class _Old:
    """What a delta keeps of a previous list: what says its product changed, and its reach (a plain
    class with slots: a delta makes one per product of the previous feed)."""

    __slots__ = ("fingerprint", "key", "neighbours", "radius", "listed_by", "_known")

    def __init__(
        self,
        fingerprint: str,
        key: tuple[Any, ...] | None,
        neighbours: tuple[str, ...],  # the products it kept (`Listed.kept`)
        radius: float | None,  # what it kept is complete this far (None: all of its class; -1: no class)
        listed_by: Any,  # with no class: the lists' values that hold it (`neighbours.listed_by`), as read
    ) -> None:
        self.fingerprint, self.key, self.neighbours = fingerprint, key, neighbours
        self.radius, self.listed_by = radius, listed_by
        self._known: ClassKey | None | bool = False  # False: not worked out yet

    @property
    def known(self) -> ClassKey | None:
        """Its class (`neighbours.match_key` of its `same` values), worked out once."""
        if self._known is False:
            self._known = None if self.key is None else match_key(self.key)
        return self._known  # type: ignore[return-value]

    def reaches(self, distance: float, product_id: str) -> bool:
        """Whether a product this far would have been kept: before the last one kept by (distance,
        product id), the order lists are cut in (at the radius itself, a product with a larger id than
        the last kept one was left out, and so might others tied with it)."""
        if self.radius is None:
            return True
        last = self.neighbours[-1] if self.neighbours else ""
        return distance < self.radius or (distance == self.radius and product_id <= last)


def refuse_untracked(rules: FeedRules) -> None:
    """Raise `Refused` for rules a delta does not track: diversity, caps and the colour re-rank choose
    among pools that a change reaches further than the k-th neighbour."""
    if rules.rules.active or rules.colour_weight:
        raise Refused(
            "--since tracks nearest-first lists only (with filters, --same and --exclude): --diversity, "
            "--max-per, --colour-weight, --boost and --decay choose among pools a change reaches further "
            "than the k-th neighbour; make a full feed (without --since)"
        )


def _check_comparable(previous: StateFile, index: VectorIndex, rules: FeedRules) -> None:
    fresh = "make a full feed (without --since)"
    header = previous.header
    if header.get("options") != rules.describe():
        raise Refused(
            f"the previous feed was made with other options ({_said(header.get('options'))}) than these "
            f"({_said(rules.describe())}): {fresh}"
        )
    now = state_header(index, rules)
    if (header.get("collection"), header.get("model_version")) != (now["collection"], now["model_version"]):
        raise Refused(
            f"the previous feed was made from {header.get('collection')} "
            f"(model {header.get('model_version')}); "
            f"the live version is {now['collection']} (model {now['model_version']}): a reindex or rollback "
            f"since: {fresh}"
        )


def _said(options: Any) -> str:
    if not isinstance(options, dict):
        return "unknown"
    filters = {k: v for k, v in (options.get("filters") or {}).items() if v not in (None, [], {})}
    parts = [f"k {options.get('k')}", f"same {options.get('same') or '-'}"]
    parts += [f"{k} {v}" for k, v in filters.items()]
    shown = ("diversity", "max_per", "colour_weight", "exclude", "boost", "decay")
    parts += [f"{k} {options[k]}" for k in shown if options.get(k)]
    return ", ".join(parts)


class _Now(NamedTuple):
    """A product listed now, as a delta compares it with its previous record."""

    fingerprint: str  # what says its vectors changed
    key: tuple[SameValue, ...] | None  # its `same` values
    listed_by: tuple[tuple[SameValue, ...], ...] | None  # with no class: the values lists hold it by


def _now(
    index: VectorIndex, rules: FeedRules, progress: Progress | None
) -> tuple[dict[str, _Now], Counter[ClassKey]]:
    """Each product listed now, read from the payloads (vectors only for points without a vectors
    hash). And the classes' sizes."""
    fields = [payload_key(name) for name in ("product_id", "vectors_hash", "model_version", *rules.same)]
    now: dict[str, _Now] = {}
    sizes: Counter[ClassKey] = Counter()
    unhashed: list[str] = []
    total = index.count(rules.filters)
    for payload in index.all_payloads(rules.filters, fields):
        product_id = str(payload["product_id"])
        key = same_key(payload, rules.same)
        held = listed_by(payload, rules.same) if key is None else None  # `listed_by`: None with a class
        now[product_id] = _Now(fingerprint(payload, None), key, held)
        if key is not None:
            sizes[match_key(key)] += 1
        if not payload.get("vectors_hash"):
            unhashed.append(product_id)
        if len(now) % 10_000 == 0:
            tell(progress, "changes", len(now), max(total, len(now)))
    for start in range(0, len(unhashed), BATCH):
        found = index.vectors(unhashed[start : start + BATCH])
        for product_id, vectors in found.items():
            now[product_id] = now[product_id]._replace(fingerprint=fingerprint({}, vectors))
    tell(progress, "changes", len(now), len(now))
    return now, sizes


Entered = dict[str, list[tuple[str, float, int]]]  # list → (moved product, its distance, its photo)


def delta(
    index: VectorIndex,
    rules: FeedRules,
    since: Path,
    out: Path,
    fmt: Format,
    progress: Progress | None,
    written: Callable[[], set[str]],
) -> dict[str, Any]:
    previous = read_state(since)
    _check_comparable(previous, index, rules)
    beside = vectors_path(since.resolve())  # beside the file a link names, as its state is
    with kept_vectors(out, beside) as kept:
        photos = Photos(index.points, recorded_fingerprint, kept, KeptVectors(beside))
        return _delta_kept(index, rules, previous, photos, out, fmt, progress, written)


def _delta_kept(
    index: VectorIndex,
    rules: FeedRules,
    previous: StateFile,
    photos: Photos,
    out: Path,
    fmt: Format,
    progress: Progress | None,
    written: Callable[[], set[str]],
) -> dict[str, Any]:
    """A delta on `previous`, its classes' photos read through `photos` (the previous feed's where they
    did not change), which keeps them for the next."""
    old: dict[str, _Old] = {}
    spans: dict[str, tuple[int, int]] = {}  # where each record lies in the previous state
    in_lists: set[str] = set()  # every product the previous lists hold, where its trailer does not say
    gather = previous.unlisted is None  # which of them have no record (`StateFile.unlisted`)
    first = itemgetter(0)
    for record, offset, length in previous.records():
        try:
            key = None if record["key"] is None else tuple(record["key"])
            neighbours = tuple(map(first, record["n"]))
            if gather:
                in_lists.update(neighbours)
            old[record["id"]] = _Old(record["fp"], key, neighbours, record["r"], record.get("in"))
        except (TypeError, KeyError, IndexError):  # fields of other types than a state writes
            raise Refused(
                f"the state {previous.path} is damaged at byte {offset}: make a full feed (without --since)"
            ) from None
        spans[record["id"]] = (offset, length)
    now, sizes = _now(index, rules, progress)
    fields = list(dict.fromkeys([*rules.listed_fields(), *rules.hit_fields()]))
    limit = read_limit(index, rules)
    read = classes_read(sizes, limit)
    classes = Classes(index, fields, [class_filters(rules, known) for known in read], photos)
    gone = old.keys() - now.keys()
    rewritten = previous.written  # while the previous feed ran: its lists may hold them as they were then
    moved = {
        p
        for p, listed in now.items()
        if p not in old
        or p in rewritten
        or old[p].fingerprint != listed.fingerprint
        or not _alike(old[p].key, listed.key)
        or not _alike(old[p].listed_by, listed.listed_by)
    }
    # A neighbour deleted while the previous feed ran is in lists but had no line of its own.
    unlisted = in_lists if gather else previous.unlisted  # now checked against the state's checksum
    if unlisted is None:
        raise Refused(f"the state {previous.path} changed while it was read: make a full feed (no --since)")
    vanished = unlisted - now.keys()
    touched = gone | moved | vanished
    entered, searched_around = _reached(index, classes, rules, sorted(moved), now, old, progress)
    # A class read whole now and not by the previous feed, or the other way round (it grew, shrank, or
    # passed another): its lists are searched again, in the arithmetic a full feed now uses for them.
    before = Counter(known for r in old.values() if (known := r.known) is not None)
    read_before = previous.header.get("classes_read", CLASSES_READ)  # a state from before: 64
    if not (read_before is None or (isinstance(read_before, int) and read_before >= 0)):
        read_before = CLASSES_READ
    switched = set(read).symmetric_difference(classes_read(before, read_before))
    redo = {p for p in old.keys() & now.keys() - touched if old[p].known in switched}
    # Every other list: none of its kept products changed and nothing new came within its reach.
    searched = touched | redo
    mend = {
        p
        for p, record in old.items()
        if p not in searched and (p in entered or touched.intersection(record.neighbours))
    }
    compared = mend | redo | (moved & old.keys())  # their lists as the previous feed held them
    kept = {r["id"]: r["n"] for r in previous.read_at(sorted(spans[p] for p in compared))}
    lists: dict[str, Listed] = {}
    search = moved | redo
    for product_id in sorted(mend):
        mended = _mended(product_id, kept[product_id], entered.get(product_id, []), touched, old, now, rules)
        if mended is None:
            search.add(product_id)
        else:
            lists[product_id] = mended
    ordered = sorted(search)
    for start in range(0, len(ordered), BATCH):
        ids = ordered[start : start + BATCH]
        payloads = index.payloads(ids)
        for listed in lists_for(
            index, [(p, payloads[p]) for p in ids if p in payloads], rules, searcher=classes
        ):
            lists[listed.product_id] = _as_read_first(listed, now.get(listed.product_id))
        tell(progress, "neighbours", min(start + BATCH, len(ordered)), len(ordered))
    late = {p for p in search if p in old and p not in lists}  # deleted since it was read
    gone |= late
    photos.carry({p: listed.fingerprint for p, listed in now.items()})  # the classes it did not read

    def produce(writer: FeedWriter, state: StateWriter) -> None:
        for product_id in sorted(lists):
            listed = lists[product_id]
            if not _same_list(listed.hits, kept.get(product_id), rules.k):
                writer.write_list(product_id, listed.hits)
        for product_id in sorted(gone):
            writer.write_deleted(product_id)
        run_start, run_end, run = 0, 0, 0  # a run of unchanged records, copied as bytes
        for product_id, (offset, length) in spans.items():
            if product_id not in gone and product_id not in lists:
                if not run:
                    run_start = offset
                run_end, run = offset + length, run + 1
                continue
            if run:
                previous.copy_span(state, run_start, run_end, run)
                run = 0
            if product_id in lists:
                state.record(lists.pop(product_id))
        if run:
            previous.copy_span(state, run_start, run_end, run)
        for listed in lists.values():  # new to the feed
            state.record(listed)
        # The lists copied hold products unchanged, all recorded but those deleted since they were read
        # (`late`); the lists written may hold those, products added since, and products gone before
        # the store was read and written again since (a class read after it holds them), none recorded.
        state.unlisted = late | {p for p in state.held - state.recorded if p not in old or p in gone}

    made: Written = write_feed(out, fmt, False, state_header(index, rules, limit), produce, written)
    return {
        "products": made.state_products,
        "moved": len(moved),
        "searched_around": searched_around,
        "queried": len(ordered),
        "mended": len(mend) - len(search - moved - redo),
        "lists_written": made.lists,
        "deleted": made.deleted,
        "uncoloured": 0,
        "photos_reused": photos.reused,
    }


def _as_read_first(listed: Listed, first: _Now | None) -> Listed:
    """A list searched by a delta, recorded under what the delta read of its product first (`_now`),
    not what the search read: a write meanwhile (new photos, another class) may postdate vectors
    other lists were chosen with (a class read earlier), and a record that already says it would
    never move the product, so those lists would never be searched again. Recorded as read first,
    the next delta sees the change and moves it. A product added since is recorded under no
    fingerprint (one no read gives), and moves too."""
    if first is None:
        return replace(listed, fingerprint="")
    return replace(listed, fingerprint=first.fingerprint, key=first.key, listed_by=first.listed_by)


def _alike(before: Sequence[Any] | None, now: Sequence[Any] | None) -> bool:
    """Whether `same` values (or `listed_by`'s lists of them) are spelled alike, types too: any change
    of spelling moves a product (True and 1 are two classes though Python holds them equal; 1 and 1.0
    are one, and moving such a product costs a search, never a list). A list read from the state and
    a tuple made now are alike where their values are."""
    if before is None or now is None:
        return before is now
    if len(before) != len(now):
        return False
    for b, n in zip(before, now, strict=True):
        if isinstance(b, list | tuple):
            if not (isinstance(n, list | tuple) and _alike(b, n)):
                return False
        elif type(b) is not type(n) or b != n:
            return False
    return True


def _mended(
    product_id: str,
    kept: list[list[Any]],
    entered: list[tuple[str, float, int]],
    touched: set[str],
    old: dict[str, _Old],
    now: dict[str, _Now],
    rules: FeedRules,
) -> Listed | None:
    """A list mended without a search: its kept products that did not change and the moved ones that
    came within its reach, while at least k of them (or all of its class) remain; None otherwise."""
    within = old[product_id].radius
    # [id, distance, photo] as the state holds them (its checksum vouches for their types)
    candidates: list[Any] = [n for n in kept if n[0] not in touched]
    candidates += entered
    candidates.sort(key=itemgetter(1, 0))
    if within is not None and len(candidates) < rules.k:
        return None  # too few left: only a search knows what lies beyond its reach
    depth = min(MAX_K, RESERVE * rules.k)
    if len(candidates) > depth:
        candidates, within = candidates[:depth], candidates[depth - 1][1]
    hits = [Hit(n, d, {}, m) for n, d, m in candidates[: rules.k]]
    fingerprint, key, _ = now[product_id]
    return Listed(product_id, hits, fingerprint, key, candidates, within)


def _same_list(hits: list[Hit], before: list[list[Any]] | None, k: int) -> bool:
    """Whether a list is the one the previous feed held (ids, photos, distances to float32 precision)."""
    if before is None:
        return False
    before = before[:k]
    if len(before) != len(hits):
        return False
    return all(
        h.product_id == b[0]
        and h.matched == b[2]
        and math.isclose(h.distance, b[1], rel_tol=1e-6, abs_tol=1e-6)
        for h, b in zip(hits, before, strict=True)
    )


def _enter(
    product_id: str,
    searches: dict[tuple[int, int], list[Hit]],
    old: dict[str, _Old],
    entered: Entered,
    several: bool,
) -> None:
    """Add a moved product to each previous list it comes within reach of, at its nearest photo's
    distance (its searches, by (photo, class searched)). Of equally near pairs of photos, the one a
    full feed matches: the list's first photo, then the moved product's first (each search's hits say
    which of the list's photos matched); photo 0 where its payload does not list `several` (as a
    search's hit says it)."""
    nearest: dict[str, tuple[float, int, int]] = {}  # list → (distance, its photo, the moved one's photo)
    for (photo, _), hits in searches.items():
        for hit in hits:
            pair = (hit.distance, hit.matched, photo)
            if hit.product_id not in nearest or pair < nearest[hit.product_id]:
                nearest[hit.product_id] = pair
    for listed_id, (distance, _, photo) in nearest.items():
        listing = old.get(listed_id)
        if listing is not None and listing.reaches(distance, product_id):
            entered.setdefault(listed_id, []).append((product_id, distance, photo if several else 0))


def _reached(
    index: VectorIndex,
    classes: Classes,
    rules: FeedRules,
    moved: Sequence[str],
    now: dict[str, _Now],
    old: dict[str, _Old],
    progress: Progress | None,
) -> tuple[Entered, int]:
    """The previous lists each moved product now comes within reach of, with its distance and photo:
    its surroundings within its class (each class listing it, `neighbours.listed_by`), searched until
    past the class's farthest reach (all of the class where a list there holds all of it). And how many
    moved products were searched around."""
    farthest: dict[ClassKey, float] = {}  # class → how far its lists reach
    for record in old.values():
        if (known := record.known) is not None and record.radius != -1.0:
            reach = math.inf if record.radius is None else record.radius
            farthest[known] = max(farthest.get(known, -math.inf), reach)
    around: dict[str, list[ClassKey]] = {}  # moved product → the classes searched around it
    for product_id in moved:
        key, held_by = now[product_id].key, now[product_id].listed_by
        if key is not None and match_key(key) in farthest:
            around[product_id] = [match_key(key)]
        elif held_by is not None and (listing := classes_listing(held_by, farthest)):
            around[product_id] = listing
    start = REACH_START * rules.k
    # Each photo of a moved product is searched on its own in each class, deeper while its hits stay
    # within reach; the product's reach is settled once none of its searches goes on.
    Search = tuple[str, tuple[int, int] | None, int]  # (product, (photo, class) or all of them, limit)
    pending: list[Search] = [(p, None, start) for p in around]
    rows_of: dict[str, np.ndarray] = {}
    several: dict[str, bool] = {}  # whether its payload lists several photos (which one matched counts)
    found: dict[str, dict[tuple[int, int], list[Hit]]] = {}
    open_searches = {p: 1 for p in around}  # a product's searches queued or under way
    entered: Entered = {}
    searched, products = 0, index.count()
    while pending:
        batch, pending = pending[:BATCH], pending[BATCH:]
        unread = [p for p, _, _ in batch if p not in rows_of]
        points = {p.product_id: p for p in index.points(unread)} if unread else {}
        for product_id in unread:  # the photos `similar` would search with (none: deleted meanwhile)
            point = points.get(product_id)
            rows_of[product_id] = query.query_rows(point.vectors, start) if point else np.zeros((0, 0))
            several[product_id] = point is not None and len(photos(point.payload)) > 1
        requests: list[SearchRequest] = []
        plans: list[tuple[str, tuple[int, int], int]] = []
        for product_id, which, limit in batch:
            rows = rows_of[product_id]
            if which is None:  # one queued for all of them
                each = [(i, c) for i in range(len(rows)) for c in range(len(around[product_id]))]
                open_searches[product_id] += len(each) - 1
                if not each:
                    found.setdefault(product_id, {})
            else:
                each = [which]
            for photo, searched_class in each:
                filters = class_filters(rules, around[product_id][searched_class])
                # its photos too: which of them matched (`_enter`)
                requests.append(SearchRequest(rows[photo], limit, filters, [product_id], list(HIT_FIELDS)))
                plans.append((product_id, (photo, searched_class), limit))
        for (product_id, which, limit), hits in zip(
            plans, classes.search_batch(requests, exact=rules.exact), strict=True
        ):
            found.setdefault(product_id, {})[which] = hits
            reach = farthest[around[product_id][which[1]]]
            if len(hits) == limit and hits[-1].distance <= reach and limit < products:
                pending.append((product_id, which, limit * 4))  # more of the class may lie within reach
            else:
                open_searches[product_id] -= 1
        for product_id in {p for p, _, _ in batch}:
            if not open_searches[product_id] and product_id in found:
                _enter(product_id, found.pop(product_id), old, entered, several[product_id])
        searched += len({p for p, _, _ in plans})
        tell(progress, "nearby", searched, searched + len(pending))
    return {p: e for p, e in entered.items() if e}, len(around)
