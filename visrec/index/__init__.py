"""The vector store behind one small interface. Only this package imports qdrant_edge or qdrant_client."""

from __future__ import annotations

from visrec.config import QdrantSettings
from visrec.filters import Filters
from visrec.index.base import VectorIndex
from visrec.index.points import Hit, IndexPoint, SearchRequest, SyncRecord, point_id
from visrec.index.store import Store

__all__ = [
    "Filters",
    "Hit",
    "IndexPoint",
    "SearchRequest",
    "Store",
    "SyncRecord",
    "VectorIndex",
    "engine_version",
    "open_index",
    "open_store",
    "point_id",
]


def open_store(settings: QdrantSettings) -> Store:
    """The server backend when `settings.url` is set, else the embedded engine under `settings.path`.

    Raises `IndexUnavailable` if a server cannot be reached.
    """
    if settings.url:
        from visrec.index.server import ServerStore

        return ServerStore(settings)
    from visrec.index.edge_store import EdgeStore

    return EdgeStore(settings)


def open_index(settings: QdrantSettings) -> VectorIndex:
    """The live version of the collection (it may not exist yet: a first sync creates it).

    Raises `IndexUnavailable` if the store cannot be opened (embedded store held by another process).
    """
    store = open_store(settings)
    return store.open(store.live(), owner=True)


def engine_version(settings: QdrantSettings) -> str:
    """The engine that holds the collections, and its version: what a snapshot records."""
    from importlib.metadata import version

    if settings.url:
        where = "local mode" if settings.url == ":memory:" else "a Qdrant server"
        return f"qdrant-client {version('qdrant-client')} ({where})"
    return f"qdrant-edge-py {version('qdrant-edge-py')} (embedded)"
