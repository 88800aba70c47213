"""Catching a copy up with the live collection: what was written to the live version while a copy of it
was made and optimized (or a new version was built) is applied to the copy before it goes live, so no
write waits for the long part and none is lost by the switch.

The writes go on into the live version, watched by a `ChangeLog`. Rounds of catch-up run beside them
until a round has little left to do; the last round runs with the writes held (`writes_held`), and
the caller makes the copy live inside that same hold, so nothing written before the switch is missed
and nothing written after it goes to the old version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from visrec.index import VectorIndex
from visrec.index.base import ChangeLog

log = logging.getLogger(__name__)

PAGE = 256  # products read back and written a call
SETTLED = 64  # a round with this few products left: the next one runs with writes held
MAX_ROUNDS = 8  # writes faster than the catch-up: hold them after this many rounds anyway

Apply = Callable[[set[str]], None]


def copy_points(source: VectorIndex, target: VectorIndex) -> Apply:
    """Catch-up for a copy of the same version: these products' points as `source` holds them now
    (vectors and payloads as they are; absent ones deleted)."""

    def apply(product_ids: set[str]) -> None:
        ids = sorted(product_ids)
        for start in range(0, len(ids), PAGE):
            page = ids[start : start + PAGE]
            points = source.points(page)
            target.upsert(points)
            target.delete(set(page) - {p.product_id for p in points})

    return apply


@contextmanager
def caught_up(
    changes: ChangeLog,
    apply: Apply,
    writes_held: Callable[[], AbstractContextManager[object]],
    prepare: Apply | None = None,
) -> Iterator[int]:
    """Apply what `changes` logged until little is left, then, with the writes held, the rest; the
    block runs inside that hold (make the copy live there). Yields the number of products applied.
    `prepare`: the slow part of applying those products (a new model's embedding of their photos), done
    for what is left just before the writes are held, so that the last round, with them held, is short."""
    applied = 0
    for _ in range(MAX_ROUNDS):
        ids = changes.take()
        apply(ids)
        applied += len(ids)
        if len(ids) <= SETTLED:
            break
    if prepare:
        prepare(changes.peek())
    with writes_held():
        ids = changes.take()
        apply(ids)
        log.info("caught up: %d written meanwhile, %d with writes held", applied + len(ids), len(ids))
        yield applied + len(ids)
