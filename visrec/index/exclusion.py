"""Where a search's `exclude` is applied: a short list by the engine (a `must_not` on point ids), a long one
(a cart, what was seen) after the engine, from a pool over-fetched by `EXCLUDE_SLACK`, the engine's
exclude the fallback when the pool runs short. Either way the answers are the engine's exclude's
wherever the search is exact (ties at the cut are `query.cut_at_k`'s, which searches deeper however the
list was cut); on the HNSW graph they are the same in every query measured (docs/measured.md).

Why: at 100,000 products (HNSW) the engine's 100-id exclude cost a query +13 to 15 %: ~0.25 ms of
Python (100 point ids, uuid5 each, then the binding's conversion of them) and ~5 % the engine's check
of every point it visits. An id cannot displace more than one hit, and a hit more costs ~4 µs (its
payload, read and converted) while the graph's ef (128) exceeds the depth: dropping the ids from a
pool 20 deeper costs ~3 %, and a second search (+100 %) only when more than 19 of the nearest (the
query product counts) are excluded. A short list (the query product itself, a recommendation's
examples) stays the engine's: a few ids cost it less than the over-fetch, and those searches keep the
path they had.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from visrec.index.points import Hit, SearchRequest

ENGINE_EXCLUDE = 16  # distinct ids up to which the engine excludes (~4 µs an id at 100k: < 2 %)
EXCLUDE_SLACK = 20  # hits a long exclude over-fetches: excluded among the nearest it absorbs

# search(requests, which): the engine's hits for `requests`, the positions `which` of the originals.
Searcher = Callable[[Sequence[SearchRequest], Sequence[int]], list[list[Hit]]]


def without_excluded(requests: Sequence[SearchRequest], search: Searcher) -> list[list[Hit]]:
    """Each request's hits without its `exclude` ids, as the engine's exclude answers them: at most
    `request.k`, fewer only when fewer points meet its filters."""
    asked = [_over_fetched(r) for r in requests]
    found = search(asked, range(len(asked)))
    kept = [_kept(r, a, hits) for r, a, hits in zip(requests, asked, found, strict=True)]
    short = [i for i, hits in enumerate(kept) if hits is None]
    # More of the nearest excluded than the pool over-fetched: the engine excludes them.
    again = dict(zip(short, search([requests[i] for i in short], short), strict=True)) if short else {}
    return [again[i] if hits is None else hits for i, hits in enumerate(kept)]


def _over_fetched(request: SearchRequest) -> SearchRequest:
    """What the engine is asked first: the request itself (a short exclude), or k + `EXCLUDE_SLACK`
    (at most one more a distinct excluded id) and nothing excluded."""
    gone = len(set(request.exclude))
    if gone <= ENGINE_EXCLUDE:
        return request
    return replace(request, k=request.k + min(gone, EXCLUDE_SLACK), exclude=())


def _kept(request: SearchRequest, asked: SearchRequest, hits: list[Hit]) -> list[Hit] | None:
    """The first k hits not excluded, or None if the pool ran short. Exact where the engine's search is:
    the over-fetched hits are the nearest (len(hits) of them) and dropping ids keeps the nearest of the
    rest; a pool the engine did not fill holds every point that meets the filters."""
    if asked is request:
        return hits
    gone = set(request.exclude)
    kept = [hit for hit in hits if hit.product_id not in gone]
    if len(kept) >= request.k or len(hits) < asked.k:
        return kept[: request.k]
    return None


@contextmanager
def by_the_engine() -> Iterator[None]:
    """Within: every exclude the engine's, however long (as before long ones were dropped after it): what
    the tests and benchmarks/rules.py compare with. One module setting: not for concurrent queries."""
    global ENGINE_EXCLUDE
    kept, ENGINE_EXCLUDE = ENGINE_EXCLUDE, sys.maxsize
    try:
        yield
    finally:
        ENGINE_EXCLUDE = kept
