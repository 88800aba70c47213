"""Embedded backend: the Qdrant engine in-process (qdrant-edge), one shard folder per collection.

qdrant-edge raises bare `Exception`s with a message; they are translated here, at the boundary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from visrec.config import QdrantSettings
from visrec.errors import CollectionMissing, IndexUnavailable, VisrecError
from visrec.index.base import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    SCROLL_PAGE,
    SYNC_FIELDS,
    Filters,
    Hit,
    IndexPoint,
    Store,
    SyncRecord,
    VectorIndex,
    point_id,
)

log = logging.getLogger(__name__)


class EdgeStore(Store):
    """Versions as folders `root/<name>__v<n>/`; the alias is the file `root/<name>.alias`, replaced
    by an atomic rename."""

    def __init__(self, settings: QdrantSettings) -> None:
        super().__init__(settings.collection)
        self.settings = settings
        self.root = settings.path
        self.alias_file = self.root / f"{self.name}.alias"

    def _collections(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if p.is_dir()] if self.root.is_dir() else []

    def _alias_target(self) -> str | None:
        try:
            return self.alias_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _point_alias(self, collection: str) -> None:
        _write_atomically(self.alias_file, collection)

    def open(self, collection: str, *, owner: bool = False) -> EdgeIndex:
        return EdgeIndex(self.root, collection, self.settings)

    def close(self) -> None:
        """Nothing to release: each index holds its own folder."""


class EdgeIndex(VectorIndex):
    """A collection stored in `root/<collection>/`; only one process may hold it open at a time.
    Its metadata lives beside it in `root/<collection>.json` (the engine keeps none)."""

    def __init__(self, root: Path, collection: str, settings: QdrantSettings | None = None) -> None:
        self.collection = collection
        self.path = root / collection
        self.metadata_file = root / f"{collection}.json"
        self.settings = settings or QdrantSettings()
        self._shard: qe.EdgeShard | None = self._open() if self.path.is_dir() else None

    def _open(self, config: qe.EdgeConfig | None = None) -> qe.EdgeShard:
        try:
            return qe.EdgeShard.load(str(self.path), config)
        except Exception as exc:  # qdrant-edge raises plain Exception with a message
            if "WouldBlock" in str(exc):
                raise IndexUnavailable(
                    f"embedded store {self.path} is in use by another process; wait for it to finish "
                    "(or point VISREC_QDRANT__PATH elsewhere)"
                ) from exc
            raise IndexUnavailable(f"cannot open embedded store {self.path}: {exc}") from exc

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise CollectionMissing(f"no collection at {self.path}: run `visrec sync` first")
        return self._shard

    def exists(self) -> bool:
        return self._shard is not None

    def create(self, dim: int, metadata: dict[str, str] | None = None) -> None:
        self._create(dim)
        if metadata is not None and metadata != self.metadata():
            _write_atomically(self.metadata_file, json.dumps(metadata))

    def metadata(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.metadata_file.read_text()))
        except FileNotFoundError:
            return {}

    def _create(self, dim: int) -> None:
        s = self.settings
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid),
            hnsw_config=qe.HnswIndexConfig(
                m=s.hnsw_m, ef_construct=s.hnsw_ef_construct, full_scan_threshold=s.full_scan_threshold_kb
            ),
        )
        if self._shard is not None:
            self._shard.close()
            self._shard = None
            try:  # loading with a config checks the stored vectors are compatible with it
                self._shard = self._open(config)
            except IndexUnavailable as exc:
                if "incompatible" in str(exc).lower():
                    raise VisrecError(
                        f"collection at {self.path} holds vectors of another size than {dim}; "
                        "sync a new model into a new collection (VISREC_QDRANT__COLLECTION)"
                    ) from exc
                raise
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shard = qe.EdgeShard.create(str(self.path), config)
        # Payload indexes before any optimize(): filtered queries stay fast and exact.
        for name in KEYWORD_FIELDS:
            shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
        for name in FLOAT_FIELDS:
            shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Float))
        self._shard = shard

    def upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            self.shard.update(
                qe.UpdateOperation.upsert_points(
                    [
                        qe.Point(point_id(p.product_id), p.vector.astype(np.float32).tolist(), p.payload)
                        for p in points
                    ]
                )
            )

    def delete(self, product_ids: Iterable[str]) -> None:
        ids: list[qe.PointId] = [point_id(p) for p in product_ids]
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points(ids))

    def sync_records(self) -> dict[str, SyncRecord]:
        records: dict[str, SyncRecord] = {}
        offset: qe.PointId | None = None
        while True:
            page, offset = self.shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=SCROLL_PAGE, with_payload=SYNC_FIELDS, with_vector=False
                )
            )
            for record in page:
                payload = record.payload or {}
                records[payload["product_id"]] = SyncRecord.from_payload(payload)
            if offset is None:
                return records

    def browse(
        self, filters: Filters, limit: int, after: str | None = None
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        page, next_id = self.shard.scroll(
            qe.ScrollRequest(offset=after, limit=limit, filter=_edge_filter(filters, ()), with_payload=True)
        )
        items = [(str((r.payload or {})["product_id"]), dict(r.payload or {})) for r in page]
        return items, None if next_id is None else str(next_id)

    def get(self, product_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        # with_vector must be positional at run time, whatever the stub says.
        found = self.shard.retrieve([point_id(product_id)], True, True)
        if not found:
            return None
        return np.asarray(found[0].vector, dtype=np.float32), dict(found[0].payload or {})

    def search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str] = (), exact: bool = False
    ) -> list[Hit]:
        request = qe.QueryRequest(
            limit=k,
            query=qe.Query.Nearest(vector.astype(np.float32).tolist()),
            filter=_edge_filter(filters, exclude),
            with_payload=True,
            params=qe.SearchParams(hnsw_ef=self.settings.hnsw_ef, exact=exact),
        )
        return [
            Hit(str((p.payload or {})["product_id"]), float(p.score), dict(p.payload or {}))
            for p in self.shard.query(request)
        ]

    def count(self, filters: Filters | None = None) -> int:
        return int(
            self.shard.count(qe.CountRequest(exact=True, filter=_edge_filter(filters or Filters(), ())))
        )

    def optimize(self) -> None:
        self.shard.optimize()

    def close(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
            self._shard = None


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` durably: readers see the old content or the new, never a part, even
    across a crash (write a temp file, fsync it, rename over, fsync the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _edge_filter(filters: Filters, exclude: Sequence[str]) -> qe.Filter | None:
    must: list[Any] = []
    for kind, key, value in filters.conditions():
        if kind == "any":
            must.append(qe.FieldCondition(key=key, match=qe.MatchAny(any=value)))
        elif kind == "range":
            must.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value[0], lte=value[1])))
        else:
            must.append(qe.FieldCondition(key=key, match=qe.MatchValue(value)))
    must_not: list[Any] = [qe.HasIdCondition({point_id(p) for p in exclude})] if exclude else []
    return qe.Filter(must=must, must_not=must_not) if must or must_not else None
