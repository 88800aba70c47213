"""The vector-store interface the rest of visrec sees; backends translate it to Qdrant's APIs."""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from visrec.errors import VisrecError

# Fixed namespace: the same product id gives the same point id on every machine, forever.
POINT_NAMESPACE = uuid.UUID("6f1c2a56-3d7e-5b8a-9c41-2e0f7d8b9a10")

KEYWORD_FIELDS = ("product_id", "category", "colour", "model_version")
FLOAT_FIELDS = ("price",)
SYNC_FIELDS = ["product_id", "content_hash", "model_version"]  # all a sync needs of each point
SCROLL_PAGE = 1000

PayloadValue = str | int | bool


def point_id(product_id: str) -> str:
    """The point id of a product: UUIDv5, so a rerun upserts the same point instead of a duplicate."""
    return str(uuid.uuid5(POINT_NAMESPACE, product_id))


class Filters(BaseModel):
    """Metadata conditions, all of which a hit must meet. Empty lists mean 'any'."""

    model_config = ConfigDict(frozen=True)

    category: list[str] = []  # any of
    colour: list[str] = []  # any of
    price_min: float | None = None
    price_max: float | None = None
    equals: dict[str, PayloadValue] = {}  # exact match on any payload field

    @model_validator(mode="after")
    def _sane_range(self) -> Filters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min} is above price_max {self.price_max}")
        return self

    def conditions(self) -> list[Condition]:
        """The filters as backend-neutral conditions; each backend maps them to its own classes."""
        out: list[Condition] = []
        if self.category:
            out.append(("any", "category", list(self.category)))
        if self.colour:
            out.append(("any", "colour", list(self.colour)))
        if self.price_min is not None or self.price_max is not None:
            out.append(("range", "price", (self.price_min, self.price_max)))
        out += [("equals", key, value) for key, value in self.equals.items()]
        return out


# ("any", field, values) | ("range", field, (gte, lte)) | ("equals", field, value)
Condition = tuple[Literal["any", "range", "equals"], str, Any]


@dataclass(frozen=True)
class IndexPoint:
    product_id: str
    vector: np.ndarray
    payload: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    product_id: str
    distance: float  # Euclidean
    payload: dict[str, Any]


@dataclass(frozen=True)
class SyncRecord:
    """What the index remembers of a product to decide whether to re-embed it."""

    content_hash: str | None
    model_version: str | None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> SyncRecord:
        return cls(payload.get("content_hash"), payload.get("model_version"))


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
    """One collection of product embeddings (Euclidean), keyed by product id."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the collection exists."""

    collection: str  # the physical collection's name

    @abstractmethod
    def create(self, dim: int, metadata: dict[str, str] | None = None) -> None:
        """Create the collection (Euclidean, `dim`) with payload indexes; no-op if it exists with `dim`.
        `metadata` (which model made the vectors) is recorded either way.

        Raises `VisrecError` if it exists with another vector size.
        """

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """What `create` recorded: `model_version` and `artefact` of the model that made the vectors."""

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points (idempotent: ids derive from product ids)."""

    @abstractmethod
    def delete(self, product_ids: Iterable[str]) -> None:
        """Delete the products' points; unknown ids are ignored."""

    @abstractmethod
    def sync_records(self) -> dict[str, SyncRecord]:
        """product id → what was indexed, for every point (payload fields only, no vectors)."""

    @abstractmethod
    def get(self, product_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A product's vector and payload, or None if it is not indexed."""

    @abstractmethod
    def browse(
        self, filters: Filters, limit: int, after: str | None = None
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """A page of (product id, payload) meeting `filters`, in point-id order, and the cursor of the next
        page (None at the end). `after` is the cursor a previous page returned."""

    @abstractmethod
    def search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str] = (), exact: bool = False
    ) -> list[Hit]:
        """The k nearest points meeting `filters`, nearest first, without the `exclude` product ids.
        `exact` skips the HNSW graph (a full scan): the ground truth for measuring recall."""

    @abstractmethod
    def count(self, filters: Filters | None = None) -> int:
        """Number of points, optionally meeting `filters`."""

    @abstractmethod
    def optimize(self) -> None:
        """Build the HNSW graph and merge segments now (blocking); the server does this on its own."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store."""


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

    @abstractmethod
    def open(self, collection: str, *, owner: bool = False) -> VectorIndex:
        """An index on `collection` (it may not exist yet). With `owner`, closing the index closes the
        store's connection too."""

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

    def switch(self, collection: str) -> None:
        """Make `collection` (an existing version) live."""
        if collection not in self.versions():
            raise VisrecError(f"{collection!r} is not a version of {self.name!r}: {self.versions()}")
        self._point_alias(collection)
