"""What crosses the vector-store interface: a product's point, a search hit, what the index remembers
of a product for sync, and the point ids and payload keys the engines address them by."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visrec.filters import Filters

# Fixed namespace: the same product id gives the same point id on every machine, forever.
POINT_NAMESPACE = uuid.UUID("6f1c2a56-3d7e-5b8a-9c41-2e0f7d8b9a10")
_NAMESPACE_BYTES = POINT_NAMESPACE.bytes


def payload_key(field: str) -> str:
    """A payload field as the engines address it: a JSON path, the name quoted (a name with a space, a
    dot or a slash is one field, not a path into an object). `payload.addressable` names only."""
    return f'"{field}"'


def field_of(key: str) -> str:
    """The field a payload index's key names (the engines list plain names bare, others quoted)."""
    return key[1:-1] if len(key) > 1 and key[0] == key[-1] == '"' else key


def point_id(product_id: str) -> str:
    """The point id of a product: UUIDv5, so a rerun upserts the same point instead of a duplicate.
    `uuid.uuid5` made directly (a third of its time: a 100-id exclude is 100 of them a query)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + product_id.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


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
    score: float | None = None  # what a rule ranked it by (smaller first), beyond the distance

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
            "score": self.distance if self.score is None else self.score,
            "matched_image": self.matched,
            "payload": shown(self.payload),
        }


@dataclass(frozen=True)
class SearchRequest:
    """One search of a batch (`VectorIndex.search_batch`): the k products nearest to `vector` meeting
    `filters`, without `exclude`; hits carry `fields` of their payload (None: all of it)."""

    vector: np.ndarray
    k: int
    filters: Filters
    exclude: Sequence[str] = ()
    fields: Sequence[str] | None = None


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
