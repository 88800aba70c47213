"""Making a neighbours feed: a full one, or a delta on a previous feed's state that costs what changed.

A full feed lists every product the filters choose (`neighbours.lists_for`, a batch at a time) and
keeps each list beside it (`feed.StateWriter`). A delta (`--since PREVIOUS`) reads that state and the
store's bookkeeping now (no vectors), and recomputes only the lists a change can reach:

- a product new to the feed, gone from it, whose vectors changed (its vectors hash) or whose `same`
  values changed is *moved*; its own list is recomputed (a gone one is written as deleted);
- a list holding a moved or gone product is recomputed;
- a list a moved product may now enter: the moved product's surroundings are searched within its class
  (the filters, and its `same` values), further and further until past the farthest k-th distance of
  that class's lists; each list found whose own k-th distance is not below the moved product's
  distance to it (or that is short of k) is recomputed.

Every other list cannot have changed: its k neighbours are unchanged and nothing new came closer than
its k-th. A change of a field no rule reads (a price, with no price filter) moves nothing. The delta
holds the lines of the lists that differ now, `deleted` lines for products gone, and the full state
beside it (previous feed + delta == a full feed now). Only nearest-first lists are tracked: a delta
refuses `--diversity`, `--max-per` and `--colour-weight`, whose pools a change reaches further.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrec import query
from visrec.errors import Refused
from visrec.feed import FeedWriter, Format, StateFile, StateWriter, Written, read_state, write_feed
from visrec.index import Hit, SearchRequest, VectorIndex
from visrec.index.points import payload_key
from visrec.neighbours import (
    BATCH,
    FeedRules,
    Listed,
    batches,
    check_against,
    fingerprint,
    lists_for,
    same_key,
    with_same,
)

Progress = Callable[[str, int, int], None]
REACH_START = 4  # a moved product's first search around it fetches this many times k


def _tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _header(index: VectorIndex, rules: FeedRules) -> dict[str, Any]:
    return {
        "options": rules.describe(),
        "collection": index.collection,
        "model_version": index.metadata().get("model_version", ""),
    }


def make_feed(
    index: VectorIndex,
    rules: FeedRules,
    out: Path,
    fmt: Format,
    since: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The feed at `out` (a delta on `since`'s state when given) and its summary."""
    started = time.monotonic()
    check_against(index, rules)
    if since is None:
        summary = _full(index, rules, out, fmt, progress)
    else:
        refuse_untracked(rules)
        summary = _delta(index, rules, read_state(since), out, fmt, progress)
    return {
        "feed": str(out),
        "state": str(out.with_name(out.name + ".state")),
        "format": fmt,
        "kind": "full" if since is None else "delta",
        "since": None if since is None else str(since),
        "k": rules.k,
        "same": list(rules.same),
        **summary,
        "seconds": round(time.monotonic() - started, 2),
    }


def _full(
    index: VectorIndex, rules: FeedRules, out: Path, fmt: Format, progress: Progress | None
) -> dict[str, Any]:
    total = index.count(rules.filters)
    counts = {"products": 0, "queried": 0, "uncoloured": 0}

    def produce(writer: FeedWriter, state: StateWriter) -> None:
        _tell(progress, "neighbours", 0, total)
        for batch in batches(index, rules):
            for listed in lists_for(index, batch, rules):
                writer.write_list(listed.product_id, listed.hits)
                state.record(listed)
                counts["products"] += 1
                counts["uncoloured"] += listed.uncoloured
            counts["queried"] += len(batch)
            _tell(
                progress,
                "neighbours",
                min(counts["queried"], max(total, counts["queried"])),
                max(total, counts["queried"]),
            )

    written = write_feed(out, fmt, rules.ranks_by_more_than_distance, _header(index, rules), produce)
    return {**counts, "lists_written": written.lists, "deleted": 0}


@dataclass(frozen=True)
class _Old:
    """What a delta keeps of a previous list: what says its product changed, and its reach."""

    fingerprint: str
    key: tuple[Any, ...] | None
    neighbours: tuple[str, ...]
    radius: float | None  # None: short of k (anything in its class may enter); -1: nothing can


def refuse_untracked(rules: FeedRules) -> None:
    """Raise `Refused` for rules a delta does not track: diversity, caps and the colour re-rank choose
    among pools that a change reaches further than the k-th neighbour."""
    if rules.rules.active or rules.colour_weight:
        raise Refused(
            "--since tracks nearest-first lists only (with filters and --same): --diversity, --max-per and "
            "--colour-weight choose among pools a change reaches further than the k-th neighbour; make a "
            "full feed (without --since)"
        )


def _check_comparable(previous: StateFile, index: VectorIndex, rules: FeedRules) -> None:
    fresh = "make a full feed (without --since)"
    header = previous.header
    if header.get("options") != rules.describe():
        raise Refused(
            f"the previous feed was made with other options ({_said(header.get('options'))}) than these "
            f"({_said(rules.describe())}): {fresh}"
        )
    now = _header(index, rules)
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
    parts += [f"{k} {options[k]}" for k in ("diversity", "max_per", "colour_weight") if options.get(k)]
    return ", ".join(parts)


def _radius(record: dict[str, Any], k: int) -> float | None:
    if record["key"] is None:
        return -1.0
    return float(record["n"][-1][1]) if len(record["n"]) >= k else None


def _now(
    index: VectorIndex, rules: FeedRules, progress: Progress | None
) -> dict[str, tuple[str, tuple[Any, ...] | None]]:
    """Each product listed now: what says its vectors changed, and its `same` values; read from the
    payloads (vectors only for points without a vectors hash)."""
    fields = [payload_key(name) for name in ("product_id", "vectors_hash", "model_version", *rules.same)]
    now: dict[str, tuple[str, tuple[Any, ...] | None]] = {}
    unhashed: list[str] = []
    total = index.count(rules.filters)
    for payload in index.all_payloads(rules.filters, fields):
        product_id = str(payload["product_id"])
        key = same_key(payload, rules.same)
        now[product_id] = (fingerprint(payload, None), key)
        if not payload.get("vectors_hash"):
            unhashed.append(product_id)
        if len(now) % 10_000 == 0:
            _tell(progress, "changes", len(now), max(total, len(now)))
    for start in range(0, len(unhashed), BATCH):
        found = index.vectors(unhashed[start : start + BATCH])
        for product_id, vectors in found.items():
            now[product_id] = (fingerprint({}, vectors), now[product_id][1])
    _tell(progress, "changes", len(now), len(now))
    return now


def _delta(
    index: VectorIndex,
    rules: FeedRules,
    previous: StateFile,
    out: Path,
    fmt: Format,
    progress: Progress | None,
) -> dict[str, Any]:
    _check_comparable(previous, index, rules)
    old: dict[str, _Old] = {}
    for record, _ in previous.records():
        neighbours = tuple(n[0] for n in record["n"])
        key = None if record["key"] is None else tuple(record["key"])
        old[record["id"]] = _Old(record["fp"], key, neighbours, _radius(record, rules.k))
    now = _now(index, rules, progress)
    gone = old.keys() - now.keys()
    moved = {
        p for p, (fp, key) in now.items() if p not in old or old[p].fingerprint != fp or old[p].key != key
    }
    touched = gone | moved
    recompute = set(moved)
    recompute.update(
        p for p, record in old.items() if p not in gone and any(n in touched for n in record.neighbours)
    )
    reached = _reached(index, rules, sorted(moved), now, old, progress)
    recompute |= reached - gone
    lists: dict[str, Listed] = {}
    ordered = sorted(recompute)
    for start in range(0, len(ordered), BATCH):
        ids = ordered[start : start + BATCH]
        payloads = index.payloads(ids)
        for listed in lists_for(index, [(p, payloads[p]) for p in ids if p in payloads], rules):
            lists[listed.product_id] = listed
        _tell(progress, "neighbours", min(start + BATCH, len(ordered)), len(ordered))
    gone |= {p for p in recompute if p in old and p not in lists}  # deleted since it was read

    def produce(writer: FeedWriter, state: StateWriter) -> None:
        for product_id in ordered:
            listed = lists.get(product_id)
            if listed is not None and (
                product_id not in old or not _same_list(listed.hits, previous_lists.get(product_id))
            ):
                writer.write_list(product_id, listed.hits)
        for product_id in sorted(gone):
            writer.write_deleted(product_id)
        for record, line in previous.records():
            product_id = record["id"]
            if product_id in gone:
                continue
            if product_id in lists:
                state.record(lists.pop(product_id))
            else:
                state.copy(line)
        for listed in lists.values():  # new to the feed
            state.record(listed)

    previous_lists = {
        record["id"]: record["n"] for record, _ in previous.records() if record["id"] in recompute
    }
    written: Written = write_feed(out, fmt, False, _header(index, rules), produce)
    return {
        "products": written.state_products,
        "moved": len(moved),
        "searched_around": len([p for p in moved if now[p][1] is not None]),
        "queried": len(ordered),
        "lists_written": written.lists,
        "deleted": written.deleted,
        "uncoloured": 0,
    }


def _same_list(hits: list[Hit], before: list[list[Any]] | None) -> bool:
    """Whether a list is the one the previous feed held (ids, photos, distances to float32 precision)."""
    if before is None or len(before) != len(hits):
        return False
    return all(
        h.product_id == b[0]
        and h.matched == b[2]
        and math.isclose(h.distance, b[1], rel_tol=1e-6, abs_tol=1e-6)
        for h, b in zip(hits, before, strict=True)
    )


def _reached(
    index: VectorIndex,
    rules: FeedRules,
    moved: Sequence[str],
    now: dict[str, tuple[str, tuple[Any, ...] | None]],
    old: dict[str, _Old],
    progress: Progress | None,
) -> set[str]:
    """The previous lists a moved product may now enter: its surroundings within its class, searched
    until past the class's farthest k-th distance (all of it where a list there is short of k)."""
    farthest: dict[tuple[Any, ...], float] = {}
    for record in old.values():
        if record.key is not None and record.radius != -1.0:
            reach = math.inf if record.radius is None else record.radius
            farthest[record.key] = max(farthest.get(record.key, -math.inf), reach)
    pending = [(p, REACH_START * rules.k) for p in moved if now[p][1] in farthest]
    found: set[str] = set()
    searched, products = 0, index.count()
    while pending:
        batch, pending = pending[:BATCH], pending[BATCH:]
        vectors = index.vectors([p for p, _ in batch])
        requests: list[SearchRequest] = []
        plans: list[tuple[str, int, int]] = []
        for product_id, limit in batch:
            if product_id not in vectors:
                continue
            key = now[product_id][1]
            assert key is not None
            rows = query.query_rows(vectors[product_id], limit)
            filters = with_same(rules.filters, rules.same, key)
            requests += [SearchRequest(row, limit, filters, [product_id], ["product_id"]) for row in rows]
            plans.append((product_id, limit, len(rows)))
        results = iter(index.search_batch(requests, exact=rules.exact))
        for product_id, limit, count in plans:
            searches = [next(results) for _ in range(count)]
            reach = farthest[now[product_id][1]]  # type: ignore[index]
            for hit in query.merge_nearest(searches, limit * count):
                listed = old.get(hit.product_id)
                if listed is not None and (listed.radius is None or hit.distance <= listed.radius):
                    found.add(hit.product_id)
            if any(len(s) == limit and s[-1].distance <= reach for s in searches) and limit < products:
                pending.append((product_id, limit * 4))  # more of the class may lie within reach
        searched += len(plans)
        _tell(progress, "nearby", searched, searched + len(pending))
    return found
