"""The vector store behind one small interface. Only this package imports qdrant_edge or qdrant_client."""

from __future__ import annotations

from visrec.config import QdrantSettings
from visrec.index.base import Filters, Hit, IndexPoint, SyncRecord, VectorIndex, point_id

__all__ = ["Filters", "Hit", "IndexPoint", "SyncRecord", "VectorIndex", "open_index", "point_id"]


def open_index(settings: QdrantSettings) -> VectorIndex:
    """The server backend when `settings.url` is set, else the embedded engine under `settings.path`.

    Raises `IndexUnavailable` if the store cannot be opened (embedded store held by another process).
    """
    if settings.url:
        from visrec.index.server import ServerIndex

        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        return ServerIndex(settings.url, api_key, settings.collection, settings.timeout_s, settings.retries)
    from visrec.index.edge import EdgeIndex

    return EdgeIndex(settings.path, settings.collection)
