"""The interface of one collection the rest of visrec sees (`VectorIndex`), with the change logs that watch
its writes and the copies it is optimized in; backends translate it to Qdrant's APIs."""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from visrec.errors import PointRejected, VisrecError
from visrec.filters import Filters
from visrec.index.exclusion import without_excluded
from visrec.index.fields import PayloadFields
from visrec.index.points import Hit, IndexPoint, SearchRequest, SyncRecord, point_id
from visrec.payload import SYNC_FIELDS, photos

SCROLL_PAGE = 1000


class ChangeLog:
    """The product ids written through one index handle since the log started (`VectorIndex.watch`):
    what a copy of the collection taken then lacks. Thread-safe: a sync writes from its own thread."""

    def __init__(self, index: VectorIndex) -> None:
        self._index = index
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def note(self, product_ids: Iterable[str]) -> None:
        with self._lock:
            self._ids.update(product_ids)

    def peek(self) -> set[str]:
        """The ids written since the last take (kept)."""
        with self._lock:
            return set(self._ids)

    def take(self) -> set[str]:
        """The ids written since the last take (and forgets them)."""
        with self._lock:
            ids, self._ids = self._ids, set()
            return ids

    def close(self) -> None:
        """Stop recording."""
        self._index._stop_watching(self)


class IndexCopy(ABC):
    """A copy of a collection's files (`VectorIndex.copy`), taken beside its writes and settled with
    them held, to be optimized apart and made the collection's storage once it has caught up with the
    live one."""

    folder: Path

    @abstractmethod
    def settle(self) -> None:
        """With the collection's writes held: make the copy exactly what the collection holds now,
        rewriting only what changed since it was taken (its writes wait for this step alone). Raises
        `IndexUnavailable`, the copy removed, if it cannot."""

    @abstractmethod
    def optimize(self) -> None:
        """Optimize the copy in a process of its own (the GIL stays free)."""

    @abstractmethod
    def open(self) -> VectorIndex:
        """A handle on the copy."""

    @abstractmethod
    def make_current(self) -> None:
        """From now on the collection is the copy (one atomic pointer change, durable)."""

    @abstractmethod
    def discard(self) -> None:
        """Remove the copy (never made current)."""


class Closing(ABC):
    """Closes itself at the end of a `with` block."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class VectorIndex(PayloadFields, Closing):
    """One collection of product embeddings (Euclidean), keyed by product id.

    A product is one point holding a vector per photo (a Qdrant multivector compared by MaxSim): a query
    vector's score for a product is its distance to the product's nearest photo, so every query answers
    distinct products, and sync, deletes, counts and paging stay per product (docs/photo_layout.md).
    Collections made before several photos were supported hold one plain vector a point: they keep
    working, and take one-photo products only until a reindex.

    Backends implement the underscored primitives; what is the same whatever the engine (creating with
    metadata, paging through points, which photo matched, closing an owned store) lives here, and what
    it does with payload fields in `PayloadFields`.
    """

    collection: str  # the physical collection's name
    multivector: bool = True  # False: a collection from before several photos per product
    owned_store: Closing | None = None  # its store, closed with it (`Store.open(..., owner=True)`)
    _change_logs: tuple[ChangeLog, ...] = ()  # watching this handle's writes (`watch`)
    _writes: int = 0  # writes through this handle (`state`)
    _epoch: str | None = None  # this handle's own, random: no other handle's counter can repeat it

    def create(self, dim: int, metadata: dict[str, str] | None = None) -> None:
        """Create the collection (Euclidean, `dim`) with payload indexes; no-op if it exists with `dim`.
        `metadata` (which model made the vectors) is recorded either way.

        Raises `VisrecError` if it exists with another vector size.
        """
        self._create(dim)
        if metadata is not None and metadata != self.metadata():
            self._write_metadata(metadata)

    @abstractmethod
    def _create(self, dim: int) -> None:
        """Create the collection and its payload indexes, or check an existing one holds `dim` vectors."""

    # Every write goes through these three, which tell the change logs watching this handle. Noted after
    # the write, failed or not: a catch-up that read a product because the log named it must have seen
    # that write, and one still under way is noted for the next round (`visrec.catchup`).
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points (idempotent: ids derive from product ids)."""
        with self._writing(p.product_id for p in points):
            if points:
                self._index_new_fields(p.payload for p in points)
            self._upsert(points)

    def delete(self, product_ids: Iterable[str]) -> None:
        """Delete the products' points; unknown ids are ignored."""
        ids = list(product_ids)
        with self._writing(ids):
            self._delete(ids)

    def overwrite_payloads(self, payloads: Mapping[str, dict[str, Any]]) -> None:
        """Replace the payloads of indexed products (product id → payload), vectors untouched; needs no
        optimize() and is visible to the next query."""
        with self._writing(payloads):
            if payloads:
                self._index_new_fields(payloads.values())
            self._overwrite_payloads(payloads)

    @contextmanager
    def _writing(self, product_ids: Iterable[str]) -> Iterator[None]:
        """Around a write: afterwards, failed or not (a failed one may have written part), the write is
        counted and stamped (`state`) and the change logs told. A stamp that fails after a failed write
        leaves that write's error to be raised."""
        ids = list(product_ids)
        try:
            yield
        except BaseException:
            self._writes += 1
            with suppress(VisrecError):
                self._stamp()
            self._noting(ids)
            raise
        self._writes += 1
        try:
            self._stamp()
        finally:
            self._noting(ids)

    def _stamp(self) -> None:
        """Record in the store that a write happened, for other processes' `state` (a server's); the
        embedded engine needs none: only one process can hold its folder, this one."""

    def state(self) -> str:
        """A token that changes whenever the collection's points or payloads may have changed, written
        by any process: what a cached answer (its ETag) is valid for. On the embedded engine, this
        handle's writes (the engine locks its folder: no other process can write meanwhile, and a handle
        opened later, in any process, has an epoch of its own); a server overrides it with the stamp
        every writer leaves in the collection."""
        if self._epoch is None:
            self._epoch = uuid.uuid4().hex
        return f"{self._epoch}.{self._writes}"

    def watch(self) -> ChangeLog:
        """A log of the product ids written through this handle from now on (until it is closed)."""
        change_log = ChangeLog(self)
        with _WATCHING:
            self._change_logs = (*self._change_logs, change_log)
        return change_log

    def _stop_watching(self, change_log: ChangeLog) -> None:
        with _WATCHING:
            self._change_logs = tuple(w for w in self._change_logs if w is not change_log)

    def _noting(self, product_ids: Iterable[str]) -> None:
        watchers = self._change_logs  # a tuple, replaced whole: a snapshot without the lock
        if watchers:
            ids = list(product_ids)
            for watcher in watchers:
                watcher.note(ids)

    @abstractmethod
    def _upsert(self, points: Sequence[IndexPoint]) -> None: ...

    @abstractmethod
    def _delete(self, product_ids: list[str]) -> None: ...

    @abstractmethod
    def _overwrite_payloads(self, payloads: Mapping[str, dict[str, Any]]) -> None: ...

    @property
    def place(self) -> str:
        """What this handle holds, the same for every handle on the same storage: an embedded
        collection's folder, a server's collection name (at most one handle a place: `visrec.live`)."""
        return self.collection

    def copy(self) -> IndexCopy | None:
        """A copy of this collection's storage, taken beside its writes (`IndexCopy.settle` then makes
        it exact, with them held), for an optimize or a snapshot that stops nothing; None for a backend
        that optimizes on its own (a server)."""
        return None

    def flush(self) -> None:
        """Write what is buffered to disk, beside writes (before a `copy`: the flush it does with writes
        held then finds little left). A no-op where storage is not this process's."""

    def payloads(self, product_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """product id → payload, for the ids that are indexed (no vectors read)."""
        return {
            str(payload["product_id"]): payload
            for _, _, payload in self._retrieve(list(product_ids), with_payload=True, with_vectors=False)
        }

    def unindexed_points(self) -> int:
        """Points not yet in the HNSW graph (searched by a full scan until optimize()); 0 where the
        store indexes on its own (a server)."""
        return 0

    def sync_records(self, product_ids: Sequence[str] | None = None) -> dict[str, SyncRecord]:
        """product id → what was indexed, for every point, or for `product_ids` (those indexed) alone: a
        write of a few rows reads their records, not the collection's (1.5 s at 100k points)."""
        if product_ids is not None:
            found = self.payloads(product_ids)
            return {product_id: SyncRecord.from_payload(p) for product_id, p in found.items()}
        return {
            payload["product_id"]: SyncRecord.from_payload(payload)
            for payload in self.all_payloads(Filters(), list(SYNC_FIELDS))
        }

    def sync_records_page(self, after: str | None = None) -> tuple[dict[str, SyncRecord], str | None]:
        """A page of `sync_records` in point-id order, and the cursor of the next page (None: the last)."""
        page, next_page = self._scroll(self._resolved(Filters()), SCROLL_PAGE, after, list(SYNC_FIELDS))
        return {p["product_id"]: SyncRecord.from_payload(p) for p in page}, next_page

    def all_payloads(self, filters: Filters, fields: list[str] | bool = True) -> Iterator[dict[str, Any]]:
        """The payloads (`fields` of them; True: all) of every point meeting `filters`, page by page."""
        offset: str | None = None
        filters = self._resolved(filters)
        while True:
            page, offset = self._scroll(filters, SCROLL_PAGE, offset, fields)
            yield from page
            if offset is None:
                return

    def browse(
        self, filters: Filters, limit: int, after: str | None = None
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """A page of (product id, payload) meeting `filters`, in point-id order, and the cursor of the next
        page (None at the end). `after` is the cursor a previous page returned."""
        page, next_page = self._scroll(self._resolved(filters), limit, after, True)
        return [(str(payload["product_id"]), payload) for payload in page], next_page

    @abstractmethod
    def _scroll(
        self, filters: Filters, limit: int, after: str | None, fields: list[str] | bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The payloads (`fields` of them; True: all) of a page of points in point-id order, and the next
        page's point id (None at the end)."""

    @abstractmethod
    def layout(self) -> dict[str, Any]:
        """How the collection stores vectors: `multivector`, `quantization` (none, int8, binary) and
        `on_disk` (the originals), as it was created."""

    def _stored_vector(self, point: IndexPoint) -> list[float] | list[list[float]]:
        """A point's vectors as the collection stores them; raises `PointRejected` for several photos in
        a one-vector collection."""
        rows = point.photo_vectors
        if self.multivector:
            return rows.tolist()
        if len(rows) > 1:
            raise PointRejected(
                f"product {point.product_id!r} has {len(rows)} photos, but {self.collection} was made "
                "before several photos per product: `visrec reindex` builds a version that takes them"
            )
        return rows[0].tolist()

    def _query_vector(self, vector: np.ndarray) -> list[float] | list[list[float]]:
        """One query vector as the collection takes it (a multivector of one: MaxSim is then the
        distance to the nearest photo)."""
        values: list[float] = np.asarray(vector, dtype=np.float32).tolist()
        return [values] if self.multivector else values

    def points(self, product_ids: Sequence[str]) -> list[IndexPoint]:
        """The indexed ones of these products, with their vectors and payloads."""
        found = self._retrieve(list(product_ids), with_payload=True, with_vectors=True)
        return [IndexPoint(str(payload["product_id"]), vectors, payload) for _, vectors, payload in found]

    def get(self, product_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A product's vectors (photos × dim) and payload, or None if it is not indexed."""
        found = self._retrieve([product_id], with_payload=True, with_vectors=True)
        return (found[0][1], found[0][2]) if found else None

    def vectors(self, product_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """product id → its vectors (photos × dim), for the ids that are indexed."""
        by_point = {point_id(p): p for p in product_ids}
        found = self._retrieve(list(by_point.values()), with_payload=False, with_vectors=True)
        return {by_point[pid]: vectors for pid, vectors, _ in found}

    @abstractmethod
    def _retrieve(
        self, product_ids: Sequence[str], *, with_payload: bool, with_vectors: bool
    ) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        """(point id, vectors as a float32 photos × dim array (empty without `with_vectors`), payload or
        {}) of the indexed ones."""

    def search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str] = (), exact: bool = False
    ) -> list[Hit]:
        """The k products nearest to `vector` (by their nearest photo) meeting `filters`, nearest first,
        without the `exclude` product ids (the engine's, or dropped from a deeper pool after it:
        `visrec.index.exclusion`); each hit says which photo matched. `exact` skips the HNSW graph (a
        full scan): the ground truth for measuring recall. Which photo matched is worked out for the
        hits whose payload lists several (`images`, as sync writes it): only their vectors are read
        back. A `where` field no single payload index covers is searched exactly (a full scan),
        where the graph alone could miss hits the filter keeps."""
        filters = self._resolved(filters)
        scan = exact or filters.needs_scan()

        def search(requests: Sequence[SearchRequest], _: Sequence[int]) -> list[list[Hit]]:
            return [self._search(r.vector, r.k, r.filters, r.exclude, scan) for r in requests]

        hits = without_excluded([SearchRequest(vector, k, filters, exclude)], search)
        return self._with_matched([vector], hits)[0]

    def search_batch(self, requests: Sequence[SearchRequest], exact: bool = False) -> list[list[Hit]]:
        """`search` for each request, in one call to the engine (qdrant-edge's `query_batch`, a server's
        `query_batch_points`): what a feed of every product's neighbours costs is the engine's work, not
        a round trip and a Python call a query. Hits carry the request's `fields` of their payload only
        (all with None), which must hold `product_id` (and `images`, for which photo matched)."""
        resolved = [
            SearchRequest(r.vector, r.k, self._resolved(r.filters), r.exclude, r.fields) for r in requests
        ]
        scans = [exact or r.filters.needs_scan() for r in resolved]

        def search(asked: Sequence[SearchRequest], which: Sequence[int]) -> list[list[Hit]]:
            return self._search_batch(asked, [scans[i] for i in which]) if asked else []

        found = without_excluded(resolved, search)
        return self._with_matched([r.vector for r in resolved], found)

    def _search_batch(self, requests: Sequence[SearchRequest], exact: Sequence[bool]) -> list[list[Hit]]:
        """The engine's hits for each request (their `matched` left at 0); by default one `_search` each
        (full payloads)."""
        return [
            self._search(r.vector, r.k, r.filters, r.exclude, scan)
            for r, scan in zip(requests, exact, strict=True)
        ]

    def _with_matched(self, queries: Sequence[np.ndarray], found: list[list[Hit]]) -> list[list[Hit]]:
        """Each query's hits with the photo that matched it, for the hits whose payload lists several
        photos: their vectors are read back once, whichever queries found them."""
        several = {h.product_id for hits in found for h in hits if len(photos(h.payload)) > 1}
        if not several:
            return found
        vectors = self.vectors(sorted(several))
        return [
            [
                replace(h, matched=int(np.argmin(np.linalg.norm(vectors[h.product_id] - q, axis=1))))
                if h.product_id in vectors
                else h
                for h in hits
            ]
            for q, hits in zip((np.asarray(q, dtype=np.float32) for q in queries), found, strict=True)
        ]

    @abstractmethod
    def _search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str], exact: bool
    ) -> list[Hit]:
        """The engine's k nearest points, as hits (their `matched` left at 0)."""

    def count(self, filters: Filters | None = None) -> int:
        """Number of points, optionally meeting `filters` (exact)."""
        return self._count(self._resolved(filters or Filters()))

    @abstractmethod
    def _count(self, filters: Filters) -> int: ...

    @abstractmethod
    def optimize(self, *, apart: bool = False) -> None:
        """Build the HNSW graph and merge segments now (blocking); the server does this on its own.
        `apart`: in a process of its own (the embedded engine holds the GIL while it optimizes), for a
        handle no other thread uses meanwhile (it is closed and opened again)."""

    def close(self) -> None:
        """Flush and release the collection, and the store if this index owns it."""
        try:
            self._close()
        finally:
            if self.owned_store is not None:
                self.owned_store.close()

    @abstractmethod
    def _close(self) -> None: ...


_WATCHING = threading.Lock()  # adding or removing a change log (rare); noting reads a snapshot
