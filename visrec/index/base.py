"""The vector-store interface the rest of visrec sees; backends translate it to Qdrant's APIs."""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np

from visrec.errors import PointRejected, VisrecError
from visrec.filters import Filters
from visrec.payload import (
    HIDDEN_FROM_CALLERS,
    INDEX_OF,
    INDEXED,
    KIND_OF_INDEX,
    RESERVED,
    SYNC_FIELDS,
    IndexType,
    Kind,
    addressable,
    kinds_of,
    photos,
)

# Fixed namespace: the same product id gives the same point id on every machine, forever.
POINT_NAMESPACE = uuid.UUID("6f1c2a56-3d7e-5b8a-9c41-2e0f7d8b9a10")
SCROLL_PAGE = 1000
# The collection's metadata key recording, for each field callers may see, the kinds of value written to
# it (JSON: field → ["text", "bool", …]): which readings of a `where` value can match, and which fields
# hold values of several kinds (filtered by a full scan: one payload index serves one kind).
FIELD_KINDS = "field_kinds"

log = logging.getLogger(__name__)


def payload_key(field: str) -> str:
    """A payload field as the engines address it: a JSON path, the name quoted (a name with a space, a
    dot or a slash is one field, not a path into an object). `payload.addressable` names only."""
    return f'"{field}"'


def field_of(key: str) -> str:
    """The field a payload index's key names (the engines list plain names bare, others quoted)."""
    return key[1:-1] if len(key) > 1 and key[0] == key[-1] == '"' else key


def point_id(product_id: str) -> str:
    """The point id of a product: UUIDv5, so a rerun upserts the same point instead of a duplicate."""
    return str(uuid.uuid5(POINT_NAMESPACE, product_id))


@dataclass(frozen=True)
class IndexPoint:
    """A product: one vector per photo (rows in the order of `payload["images"]`; a 1-D vector is one
    photo) and its payload."""

    product_id: str
    vectors: np.ndarray
    payload: dict[str, Any]

    @property
    def photo_vectors(self) -> np.ndarray:
        """(photos, dim) float32."""
        return np.atleast_2d(np.asarray(self.vectors, dtype=np.float32))


@dataclass(frozen=True)
class Hit:
    product_id: str
    distance: float  # Euclidean, from the query to the product's nearest photo
    payload: dict[str, Any]
    matched: int = 0  # which of the product's photos (`payload.photos`) is the nearest

    @classmethod
    def of(cls, payload: dict[str, Any] | None, distance: float) -> Hit:
        payload = dict(payload or {})
        return cls(str(payload["product_id"]), float(distance), payload)

    def to_dict(self, shown: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The hit as the CLI and the API give it, its payload as `shown` lets it through
        (`visrec.payload.for_operators` or `for_callers`)."""
        return {
            "product_id": self.product_id,
            "distance": self.distance,
            "matched_image": self.matched,
            "payload": shown(self.payload),
        }


@dataclass(frozen=True)
class SyncRecord:
    """What the index remembers of a product to decide what to redo: its vectors, its payload, nothing
    (`visrec.plan`). Points from before that split carry one `content_hash` of both."""

    vectors_hash: str | None
    metadata_hash: str | None
    photo_files: list[list[Any]]
    model_version: str | None
    content_hash: str | None = None
    source: str = "catalogue"  # points from before sources were recorded came from catalogues

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> SyncRecord:
        files = payload.get("photo_files")
        return cls(
            payload.get("vectors_hash"),
            payload.get("metadata_hash"),
            files if isinstance(files, list) else [],
            payload.get("model_version"),
            payload.get("content_hash"),
            str(payload.get("source") or "catalogue"),
        )


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
    """A copy of a collection's files, taken while its writes were held (`VectorIndex.copy`), to be
    optimized apart and made the collection's storage once it has caught up with the live one."""

    folder: Path

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


class _Closing(ABC):
    """Closes itself at the end of a `with` block."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class VectorIndex(_Closing):
    """One collection of product embeddings (Euclidean), keyed by product id.

    A product is one point holding a vector per photo (a Qdrant multivector compared by MaxSim): a query
    vector's score for a product is its distance to the product's nearest photo, so every query answers
    distinct products, and sync, deletes, counts and paging stay per product (docs/photo_layout.md).
    Collections made before several photos were supported hold one plain vector a point: they keep
    working, and take one-photo products only until a reindex.

    Backends implement the underscored primitives; what is the same whatever the engine (creating with
    metadata, repairing payload indexes, paging through points, which photo matched, closing an owned
    store) lives here.
    """

    collection: str  # the physical collection's name
    multivector: bool = True  # False: a collection from before several photos per product
    owned_store: Store | None = None  # closed with this index (`Store.open(..., owner=True)`)
    _change_logs: tuple[ChangeLog, ...] = ()  # watching this handle's writes (`watch`)
    # What this handle's writes know is indexed and recorded (loaded at the first write), so that a write
    # of fields seen before costs no store call.
    _indexed: dict[str, IndexType] | None = None
    _recorded: dict[str, set[Kind]] | None = None
    SCHEMA_TYPES: ClassVar[Mapping[IndexType, object]]  # visrec's payload index types, in the engine's terms

    @abstractmethod
    def exists(self) -> bool:
        """Whether the collection exists."""

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

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """What `create` recorded: `model_version` and `artefact` of the model that made the vectors."""

    @abstractmethod
    def _write_metadata(self, metadata: dict[str, str]) -> None: ...

    def _ensure_payload_indexes(self) -> list[str]:
        """Create whichever payload index the collection lacks: `visrec.payload.INDEXED`'s, and one for
        each field of one kind that writes recorded (a folder copied before that field's first write
        lacks it); returns the fields indexed now (one schema read when none is missing)."""
        have = {field_of(key): engine for key, engine in self._payload_schema().items()}
        missing = [(name, kind) for name, kind in INDEXED if have.get(name) != self.SCHEMA_TYPES[kind]]
        recorded = _decoded(self.metadata().get(FIELD_KINDS)) if self.exists() else {}
        missing += [
            (name, INDEX_OF[next(iter(kinds))])
            for name, kinds in recorded.items()
            if len(kinds) == 1 and name not in have and addressable(name)
        ]
        for name, kind in missing:
            self._create_payload_index(name, kind)
        return [name for name, _ in missing]

    def _repair_payload_indexes(self) -> None:
        """On opening: a crash between creating the collection and its payload indexes would otherwise
        leave filtered queries slow (and, on the embedded engine, inexact after optimize()) for good."""
        if created := self._ensure_payload_indexes():
            log.warning("%s lacked payload indexes (a sync cut short?): created %s", self.collection, created)

    @abstractmethod
    def _payload_schema(self) -> dict[str, object]:
        """The collection's payload indexes: key (`payload_key`, or a plain name bare) → the engine's
        type."""

    @abstractmethod
    def _create_payload_index(self, name: str, kind: IndexType) -> None: ...

    def field_kinds(self) -> dict[str, frozenset[Kind]]:
        """field → the kinds of value written to it: the declared indexes' and what writes recorded
        (read from the store each time: another process may have written since)."""
        kinds = {name: {KIND_OF_INDEX[index]} for name, index in INDEXED}
        for name, recorded in _decoded(self.metadata().get(FIELD_KINDS)).items():
            kinds.setdefault(name, set()).update(recorded)
        return {name: frozenset(found) for name, found in kinds.items()}

    def _index_new_fields(self, payloads: Iterable[Mapping[str, Any]]) -> None:
        """Before a write: a payload index for each catalogue field callers may see that this folder has
        none for (of its first value's kind), and the kinds of value each field holds recorded in the
        collection's metadata. The metadata is the collection's, shared by its optimized copies; the
        indexes are the folder's: a copy taken before a field's first write gets its index when the
        catch-up writes that field into it."""
        seen: dict[str, dict[Kind, None]] = {}
        for payload in payloads:
            for name, value in payload.items():
                if name not in HIDDEN_FROM_CALLERS and name not in RESERVED and addressable(name):
                    seen.setdefault(name, {}).update(dict.fromkeys(kinds_of(value)))
        if self._indexed is None:
            by_type = {engine: kind for kind, engine in self.SCHEMA_TYPES.items()}
            schema = self._payload_schema().items()
            self._indexed = {field_of(key): by_type[t] for key, t in schema if t in by_type}
        for name, found in seen.items():
            if name not in self._indexed and found:
                first = next(iter(found))
                self._create_payload_index(name, INDEX_OF[first])
                self._indexed[name] = INDEX_OF[first]
                log.info("%s: payload index on %s (%s)", self.collection, name, INDEX_OF[first])
        if self._recorded is None:
            self._recorded = {name: set(kinds) for name, kinds in self.field_kinds().items()}
        unrecorded = {
            name: [k for k in kinds if k not in self._recorded.get(name, ())] for name, kinds in seen.items()
        }
        new = {name: kinds for name, kinds in unrecorded.items() if kinds}
        if not new:
            return
        metadata = self.metadata()  # as it is now: merged, not replaced
        recorded = _decoded(metadata.get(FIELD_KINDS))
        for name, kinds in new.items():
            recorded.setdefault(name, set()).update(kinds)
            self._recorded.setdefault(name, set()).update(kinds)
        encoded = {name: sorted(kinds) for name, kinds in sorted(recorded.items())}
        self._write_metadata({**metadata, FIELD_KINDS: json.dumps(encoded)})

    def _resolved(self, filters: Filters) -> Filters:
        """`filters` with the kinds each `where` field holds (`Filters.where_kinds`)."""
        if not filters.where:
            return filters
        kinds = self.field_kinds()
        fields = {where.field for where in filters.clauses}
        return filters.model_copy(update={"where_kinds": {f: kinds[f] for f in fields if f in kinds}})

    def facet(self, field: str, limit: int) -> list[tuple[str | bool, int]] | None:
        """The `limit` most frequent values of a text or boolean field and how many products hold each,
        as the engine counts them from its payload index; None for a field of numbers, of several
        kinds, or none recorded (no index to count from)."""
        kinds = self.field_kinds().get(field, frozenset())
        if len(kinds) != 1 or "number" in kinds:
            return None
        return self._facet(field, limit)

    @abstractmethod
    def _facet(self, field: str, limit: int) -> list[tuple[str | bool, int]]: ...

    # Every write goes through these three, which tell the change logs watching this handle. Noted after
    # the write, failed or not: a catch-up that read a product because the log named it must have seen
    # that write, and one still under way is noted for the next round (`visrec.catchup`).
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points (idempotent: ids derive from product ids)."""
        try:
            if points:
                self._index_new_fields(p.payload for p in points)
            self._upsert(points)
        finally:
            self._noting(p.product_id for p in points)

    def delete(self, product_ids: Iterable[str]) -> None:
        """Delete the products' points; unknown ids are ignored."""
        ids = list(product_ids)
        try:
            self._delete(ids)
        finally:
            self._noting(ids)

    def overwrite_payloads(self, payloads: Mapping[str, dict[str, Any]]) -> None:
        """Replace the payloads of indexed products (product id → payload), vectors untouched; needs no
        optimize() and is visible to the next query."""
        try:
            if payloads:
                self._index_new_fields(payloads.values())
            self._overwrite_payloads(payloads)
        finally:
            self._noting(payloads)

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
        """A copy of this collection's storage, taken now (the caller holds its writes meanwhile), for an
        optimize that stops nothing; None for a backend that optimizes on its own (a server)."""
        return None

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
        without the `exclude` product ids; each hit says which photo matched. `exact` skips the HNSW
        graph (a full scan): the ground truth for measuring recall. Which photo matched is worked out
        for the hits whose payload lists several (`images`, as sync writes it): only their vectors
        are read back. A `where` field no single payload index covers is searched exactly (a full scan),
        where the graph alone could miss hits the filter keeps."""
        filters = self._resolved(filters)
        hits = self._search(vector, k, filters, exclude, exact or filters.needs_scan())
        several = [h.product_id for h in hits if len(photos(h.payload)) > 1]
        if not several:
            return hits
        found = self.vectors(several)
        query = np.asarray(vector, dtype=np.float32)
        return [
            replace(h, matched=int(np.argmin(np.linalg.norm(found[h.product_id] - query, axis=1))))
            if h.product_id in found
            else h
            for h in hits
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


def _decoded(recorded: str | None) -> dict[str, set[Kind]]:
    """The field kinds recorded in a collection's metadata (`FIELD_KINDS`); {} where none are."""
    try:
        found = json.loads(recorded or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    kinds: set[Kind] = {"text", "bool", "number"}
    return {
        str(name): {k for k in listed if k in kinds}
        for name, listed in found.items()
        if isinstance(listed, list)
    }


_WATCHING = threading.Lock()  # adding or removing a change log (rare); noting reads a snapshot


class Store(_Closing):
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

    def switch(self, collection: str) -> None:
        """Make `collection` (an existing version) live."""
        if collection not in self.versions():
            raise VisrecError(f"{collection!r} is not a version of {self.name!r}: {self.versions()}")
        self._point_alias(collection)
