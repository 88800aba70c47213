"""The versions of one collection and the alias that says which one is live: the store a backend opens
collections from (`visrec.index.open_store`)."""

from __future__ import annotations

import logging
import re
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from visrec.errors import VisrecError
from visrec.index.base import Closing, VectorIndex

log = logging.getLogger(__name__)


class Store(Closing):
    """The versions of one collection and the alias that says which one is live.

    Version n of collection `name` is the physical collection `name__vn`. A new model is synced into a
    new version, which goes live by switching the alias in one atomic step; older versions stay for
    rollback. With no alias yet, version 1 is live (a first sync needs no switch).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def _collections(self) -> list[str]:
        """Every physical collection in the store (any name)."""

    @abstractmethod
    def _alias_target(self) -> str | None:
        """The collection the alias points at, or None before the first switch."""

    @abstractmethod
    def _point_alias(self, collection: str) -> None:
        """Point the alias at `collection` atomically: readers see the old target or the new, never none."""

    def open(self, collection: str, *, owner: bool = False) -> VectorIndex:
        """An index on `collection` (it may not exist yet). With `owner`, closing the index closes the
        store too."""
        index = self._open(collection)
        if owner:
            index.owned_store = self
        return index

    @contextmanager
    def opened(self, collection: str, held: Mapping[str, VectorIndex]) -> Iterator[VectorIndex]:
        """`collection` through the handle this process already holds (left open), else opened and
        closed."""
        if collection in held:
            yield held[collection]
            return
        with self.open(collection) as index:
            yield index

    @abstractmethod
    def _open(self, collection: str) -> VectorIndex: ...

    @abstractmethod
    def close(self) -> None:
        """Release the store's connection (if it has one)."""

    def version(self, n: int) -> str:
        return f"{self.name}__v{n}"

    def versions(self) -> list[str]:
        """The collection's versions, oldest first."""
        pattern = re.compile(rf"{re.escape(self.name)}__v([0-9]+)")
        found = [(int(m.group(1)), c) for c in self._collections() if (m := pattern.fullmatch(c))]
        return [c for _, c in sorted(found)]

    def live(self) -> str:
        """The version queries use: the alias target, else version 1."""
        return self._alias_target() or self.version(1)

    def generation(self, collection: str) -> int:
        return int(collection.rsplit("__v", 1)[1])

    def place(self, collection: str) -> str:
        """What a handle on `collection` opened now would hold (`VectorIndex.place`)."""
        return collection

    def unnamed(self) -> set[str]:
        """The places of this collection's versions that nothing names any longer (an embedded folder
        a copy replaced, a copy a crash left before it was made current): removable once no handle
        holds them. None on a server."""
        return set()

    def remove(self, places: Iterable[str]) -> None:
        """Remove these places (`unnamed` ones only)."""

    def sweep_temporaries(self) -> list[str]:
        """Remove the temporary files killed writers left beside the versions (`fs.sweep_temporaries`):
        none on a server."""
        return []

    def drop(self, collection: str) -> None:
        """Remove a version that is not live and that no handle holds: a build a restore refused before
        switching to it (`visrec.snapshot.restore`). Refuses the one the alias names."""
        if collection == self._alias_target():
            raise VisrecError(f"{collection!r} is the live version of {self.name!r}: not removed")
        if collection in self.versions():
            log.info("removing %s: built, never switched to", collection)
            self._drop(collection)

    @abstractmethod
    def _drop(self, collection: str) -> None: ...

    def switch(self, collection: str) -> None:
        """Make `collection` (an existing version) live."""
        if collection not in self.versions():
            raise VisrecError(f"{collection!r} is not a version of {self.name!r}: {self.versions()}")
        self._point_alias(collection)
