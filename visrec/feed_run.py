"""Making a neighbours feed: a full one, or a delta on a previous feed's state (`feed_delta`).

A full feed lists every product the filters choose (`neighbours.lists_for`, a batch at a time: the
classes read whole into memory, the rest through the engine) and keeps each list beside it
(`feed.StateWriter`), its photos in `FEED.vectors` (`feed_vectors`) for the next delta.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from visrec.feed import (
    FeedWriter,
    Format,
    Progress,
    StateWriter,
    recorded_fingerprint,
    state_header,
    tell,
    write_feed,
)
from visrec.feed_delta import delta, refuse_untracked
from visrec.feed_vectors import Photos, kept_vectors
from visrec.index import VectorIndex
from visrec.neighbours import FeedRules, batches, check_against, lists_for, read_limit


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
    # The products written while it runs (through this handle: on the embedded store, the service's,
    # all of them) are named in its state's trailer, and the next delta moves them: a list may hold
    # one as it was between its record and now (written, then written back).
    watched = index.watch()
    try:
        with _cycles_uncollected():
            if since is None:
                summary = _full(index, rules, out, fmt, progress, watched.peek)
            else:
                refuse_untracked(rules)
                summary = delta(index, rules, since, out, fmt, progress, watched.peek)
    finally:
        watched.close()
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


_runs_lock = threading.Lock()
_runs = 0  # feeds under way in this process (a service runs them as read jobs, several at a time)
_collecting = False  # whether the cycle collector ran before the first of them


@contextmanager
def _cycles_uncollected() -> Iterator[None]:
    """Pause Python's cycle collector while feeds run (the first one in pauses it, the last one out
    resumes it as it was): a delta holds a previous state's 100,000 records and parses tens of
    thousands more, and every collection walks them all: 3.7x the parsing's own time, measured.
    Cycles made meanwhile (by the feed, or by a service's other threads) are collected once the last
    feed ends; memory freed by reference counts, nearly all of it, is freed as before."""
    global _runs, _collecting
    with _runs_lock:
        if not _runs:
            _collecting = gc.isenabled()
            gc.disable()
        _runs += 1
    try:
        yield
    finally:
        with _runs_lock:
            _runs -= 1
            if not _runs and _collecting:
                gc.enable()


def _full(
    index: VectorIndex,
    rules: FeedRules,
    out: Path,
    fmt: Format,
    progress: Progress | None,
    written: Callable[[], set[str]],
) -> dict[str, Any]:
    total = index.count(rules.filters)
    counts = {"products": 0, "queried": 0, "uncoloured": 0}

    def produce(writer: FeedWriter, state: StateWriter) -> None:
        tell(progress, "neighbours", 0, total)
        for batch, searcher in batches(index, rules, photos=photos, limit=limit):
            for listed in lists_for(index, batch, rules, searcher=searcher):
                writer.write_list(listed.product_id, listed.hits)
                state.record(listed)
                counts["products"] += 1
                counts["uncoloured"] += listed.uncoloured
            counts["queried"] += len(batch)
            done = counts["queried"]
            tell(progress, "neighbours", done, max(total, done))  # products written meanwhile count too

    limit = read_limit(index, rules)
    header = state_header(index, rules, limit)
    with kept_vectors(out) as kept:
        photos = Photos(index.points, recorded_fingerprint, kept)
        made = write_feed(out, fmt, rules.ranks_by_more_than_distance, header, produce, written)
    return {**counts, "lists_written": made.lists, "deleted": 0}
