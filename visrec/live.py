"""The live (index, model) pair a service answers from and writes to, and every index handle it holds:
one state, and its rules in one place (tests/test_live.py drives them with generated interleavings).

1. One handle a place (`VectorIndex.place`: an embedded collection's folder, a server's collection):
   the embedded engine admits one, so whoever needs a place that is held takes that handle.
2. A publication names the pair it replaces and is refused if another took its place meanwhile: a
   request that looked at the store before a writer's swap can never undo the swap.
3. Only the live pair is handed out, to readers and to the writer. Callers publish a pair only for the
   place its collection's pointer names now, so a handle that a pointer left is never served or written
   again (a handle whose place is named again, after a rollback, may be: nothing wrote to it meanwhile).
4. Every holder counts: the live pair holds its handle, and each reader, job or copy in the making holds
   one more. A handle closes when its last holder lets go, however long that is (a feed, a gate), never
   before; its model goes with it unless another pair holds that model too.
5. A place is removed only when no handle holds it and nothing names it (`Store.unnamed`). A folder a
   copy is being built in is named by nobody yet: only the start-up sweep (`sweep`, before the writer
   runs) removes unnamed folders wholesale; a handle that closes removes at most its own place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from visrec.embed import Embedder
from visrec.errors import IndexUnavailable, ModelError, VisrecError
from visrec.index import Store, VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Live:
    """The live collection version and the model that embeds photos for it: always a matching pair."""

    collection: str
    index: VectorIndex
    embedder: Embedder | None
    model_problem: ModelError | None  # why photos cannot be embedded for this version

    def model(self) -> Embedder:
        """The model for this version; raises `ModelError` if it is not available here."""
        if self.embedder is None:
            raise self.model_problem or ModelError("no model")
        return self.embedder


@dataclass(eq=False)
class _Held:
    index: VectorIndex
    holders: int
    pair: Live | None = None  # the last pair published with this handle: its model lives as long


class LiveState:
    """The live pair and the handles held, behind one lock (rules 1–5 above)."""

    def __init__(self, store: Callable[[], Store]) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._live: Live | None = None
        self._held: dict[str, _Held] = {}

    @property
    def live(self) -> Live | None:
        with self._lock:
            return self._live

    @contextmanager
    def lease(self) -> Iterator[Live]:
        """The live pair, held until the block ends. Raises `IndexUnavailable` when there is none."""
        with self._lock:
            pair = self._live
            if pair is None:
                raise IndexUnavailable("the index is being opened")
            self._held[pair.index.place].holders += 1
        try:
            yield pair
        finally:
            self.release(pair.index)

    @contextmanager
    def holding(self) -> Iterator[dict[str, VectorIndex]]:
        """Every handle held now, by collection, held until the block ends: a job reads (or, for a
        version above the live one, rebuilds) those versions through them, since no second handle
        can open them. Where a collection has two (a retired one still read), the live pair's."""
        with self._lock:
            live = self._live.index if self._live else None
            entries = sorted(
                (held for held in self._held.values() if held.index.exists()), key=lambda h: h.index is live
            )
            for held in entries:
                held.holders += 1
        try:
            yield {held.index.collection: held.index for held in entries}
        finally:
            for held in entries:
                self.release(held.index)

    def hold(self, place: str, opener: Callable[[], VectorIndex]) -> VectorIndex:
        """The handle on `place`, held once more: the one held already, else `opener()`'s (called under
        the lock, so that no one else opens the same place meanwhile)."""
        with self._lock:
            if place in self._held:
                self._held[place].holders += 1
                return self._held[place].index
            index = opener()
            if index.place != place:
                index.close()
                raise VisrecError(f"opened {index.place} for {place}")
            self._held[place] = _Held(index, 1)
            return index

    def adopt(self, index: VectorIndex) -> None:
        """Hold a handle opened on a place no one else can name yet (a copy being made); raises
        `VisrecError` if that place is held (rule 1)."""
        with self._lock:
            if index.place in self._held:
                raise VisrecError(f"{index.place} is already open in this process")
            self._held[index.place] = _Held(index, 1)

    def publish(self, fresh: Live, replacing: Live | None) -> bool:
        """Make `fresh` live if `replacing` still is (the caller holds `fresh.index`: that hold becomes
        the live pair's); the pair replaced lets its handle go. False, changing nothing, if another
        pair took `replacing`'s place meanwhile: the caller lets its hold go."""
        with self._lock:
            if self._live is not replacing:
                return False
            held = self._held.get(fresh.index.place)
            if held is None or held.index is not fresh.index:
                raise VisrecError(f"{fresh.index.place} is published without being held")
            held.pair = fresh
            self._live = fresh
            if replacing is not None:
                log.info("live collection: %s → %s", replacing.index.place, fresh.index.place)
        if replacing is not None:
            self.release(replacing.index)
        return True

    def release(self, index: VectorIndex) -> None:
        """Let one hold on `index` go: the last one closes it and removes its place if nothing names it."""
        with self._lock:
            held = self._held[index.place]
            assert held.index is index, f"{index.place} released through a handle it does not hold"
            held.holders -= 1
            if held.holders > 0:
                return
            del self._held[index.place]
            try:
                index.close()
            except VisrecError as exc:  # what it held is on disk already (each write is durable)
                log.warning("closing %s: %s", index.place, exc)
            removable = self._store().unnamed() & {index.place}
        self._store().remove(removable)

    def sweep(self) -> None:
        """Remove every place nothing names and nothing here holds: what a crash left behind. Only
        before the writer runs (a copy in the making is named by nobody yet)."""
        with self._lock:
            removable = self._store().unnamed() - set(self._held)
        self._store().remove(removable)
        self._store().sweep_temporaries()  # only files no live writer holds: safe beside anyone

    def models(self) -> list[Embedder]:
        """The models loaded: those of the pairs whose handles are held."""
        with self._lock:
            pairs = [held.pair for held in self._held.values() if held.pair is not None]
        return [pair.embedder for pair in pairs if pair.embedder is not None]

    def places(self) -> dict[str, int]:
        """Each place held and its number of holders (for tests and /metrics)."""
        with self._lock:
            return {place: held.holders for place, held in self._held.items()}

    def close(self) -> None:
        """Close every handle (the service stops)."""
        with self._lock:
            held, self._held, self._live = list(self._held.values()), {}, None
        for entry in held:
            try:
                entry.index.close()
            except VisrecError as exc:
                log.warning("closing %s: %s", entry.index.place, exc)
