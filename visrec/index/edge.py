"""Embedded backend: one collection of the Qdrant engine in-process (qdrant-edge), a shard folder per
collection (`EdgeIndex`). Copies of that folder are `edge_copy`'s, the store of its versions is
`edge_store`'s; every call into the engine goes through `edge_errors.engine_errors`."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

from visrec.config import QdrantSettings
from visrec.errors import CollectionMissing, DiskFull, IndexUnavailable, InvalidFilter, VisrecError
from visrec.filters import Filters
from visrec.fs import write_atomically
from visrec.index.base import VectorIndex
from visrec.index.edge_copy import EdgeCopy, optimize_in_child, pointer, take_copy
from visrec.index.edge_errors import StoreBusy, engine_errors
from visrec.index.edge_filter import edge_filter
from visrec.index.points import Hit, IndexPoint, SearchRequest, payload_key, point_id
from visrec.payload import IndexType

log = logging.getLogger(__name__)
_R = TypeVar("_R")

SCHEMA_TYPES: dict[IndexType, qe.PayloadSchemaType] = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}
LOCK_POLL_S = 0.1
_NEVER_CREATED = "no segments were loaded"  # a folder a crashed or failed create() left: it holds nothing


def current_folder(root: Path, collection: str) -> Path:
    """The folder that holds `collection` now: the optimized copy its pointer file
    (`<collection>.current`, replaced atomically) names, else `root/<collection>`."""
    try:
        name = pointer(root, collection).read_text().strip()
    except FileNotFoundError:
        return root / collection
    return root / name if name else root / collection


class EdgeIndex(VectorIndex):
    """A collection stored in `root/<collection>/`; only one process may hold it open at a time.
    Its metadata lives beside it in `root/<collection>.json` (the engine keeps none)."""

    SCHEMA_TYPES = SCHEMA_TYPES

    def __init__(
        self, root: Path, collection: str, settings: QdrantSettings | None = None, folder: Path | None = None
    ) -> None:
        self.collection = collection
        self.root = root
        self.path = folder or current_folder(root, collection)
        self.metadata_file = root / f"{collection}.json"
        self.settings = settings or QdrantSettings()
        self._shard: qe.EdgeShard | None = None
        self.multivector = self._stored_layout()
        if self.path.is_dir():
            try:
                self._shard = self._load()
            except IndexUnavailable as exc:
                if _NEVER_CREATED not in str(exc.__cause__):
                    raise
                log.warning(
                    "%s holds no collection (its creation was cut short): creating it anew", self.path
                )

    def _stored_vectors(self) -> dict[str, Any]:
        """The vector config of the collection on disk ({} if none). The engine keeps its config in
        `edge_config.json` and has no call that returns it."""
        try:
            vectors = json.loads((self.path / "edge_config.json").read_text())["vectors"][""]
            return vectors if isinstance(vectors, dict) else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _stored_layout(self) -> bool:
        """Whether the collection holds a multivector a point (True for one not made yet)."""
        stored = self._stored_vectors()
        return not stored or "multivector_config" in stored

    def layout(self) -> dict[str, Any]:
        stored = self._stored_vectors()
        quantization = stored.get("quantization_config") or {}
        kind = "int8" if "scalar" in quantization else "binary" if "binary" in quantization else "none"
        return {"multivector": self.multivector, "quantization": kind, "on_disk": bool(stored.get("on_disk"))}

    def _config(self, dim: int) -> qe.EdgeConfig:
        s = self.settings
        quantization: qe.ScalarQuantizationConfig | qe.BinaryQuantizationConfig | None = None
        if s.quantization == "int8":  # codes in RAM; quantile 0.99 clips outliers (Qdrant's advice)
            quantization = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        elif s.quantization == "binary":
            quantization = qe.BinaryQuantizationConfig(always_ram=True)
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=dim,
                distance=qe.Distance.Euclid,
                multivector_config=qe.MultiVectorConfig(comparator=qe.MultiVectorComparator.MaxSim),
                quantization_config=quantization,
                on_disk=s.vectors_on_disk,
            ),
            hnsw_config=qe.HnswIndexConfig(
                m=s.hnsw_m, ef_construct=s.hnsw_ef_construct, full_scan_threshold=s.full_scan_threshold_kb
            ),
        )

    def _engine(self, doing: str) -> AbstractContextManager[None]:
        return engine_errors(self.path, doing)

    def _room(self, doing: str) -> None:
        """Raise `DiskFull` unless `qdrant.min_free_mb` is free on the store's disk: better a refused
        write than a process killed by a mapped page the engine cannot allocate (another process can
        still fill the disk between this look and the write: keep the margin wide)."""
        least = self.settings.min_free_mb * 2**20
        try:
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        except OSError:
            return
        if free < least:
            raise DiskFull(
                f"embedded store {self.root}: {doing} refused: {free // 2**20} MiB free on its disk, "
                f"{least // 2**20} MiB must stay free (VISREC_QDRANT__MIN_FREE_MB); free some space"
            )

    def _load(self, config: qe.EdgeConfig | None = None) -> qe.EdgeShard:
        """Load the shard, waiting up to `lock_wait_s` for a process that is letting go of it (a killed
        sync's last moments), and make sure its payload indexes exist."""
        self._room("open")
        deadline = time.monotonic() + self.settings.lock_wait_s
        for attempt in itertools.count():
            try:
                with self._engine("open"):
                    shard = qe.EdgeShard.load(str(self.path), config)
                break
            except StoreBusy:
                if time.monotonic() >= deadline:
                    raise
                if attempt == 0:
                    log.info(
                        "%s is held by another process: waiting up to %.1f s",
                        self.path,
                        self.settings.lock_wait_s,
                    )
                time.sleep(LOCK_POLL_S)
        with self._adopting(shard):
            self._repair_payload_indexes()
        return shard

    @contextmanager
    def _adopting(self, shard: qe.EdgeShard) -> Iterator[None]:
        """Hold `shard` as this index's; if the block fails, let it go (or its lock stays with this
        process)."""
        self._shard = shard
        try:
            yield
        except BaseException:
            self._shard = None
            with suppress(Exception):
                shard.close()
            raise

    def _payload_schema(self) -> dict[str, object]:
        with self._engine("reading payload indexes"):
            return {name: index.data_type for name, index in self.shard.info().payload_schema.items()}

    def _create_payload_index(self, name: str, kind: IndexType) -> None:
        with self._engine("creating payload indexes"):
            self.shard.update(qe.UpdateOperation.create_field_index(payload_key(name), SCHEMA_TYPES[kind]))

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise CollectionMissing(f"no collection at {self.path}: run `visrec sync` first")
        return self._shard

    def exists(self) -> bool:
        return self._shard is not None

    def _write_metadata(self, metadata: dict[str, str]) -> None:
        write_atomically(self.metadata_file, json.dumps(metadata))

    def metadata(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.metadata_file.read_text()))
        except FileNotFoundError:
            return {}

    def _create(self, dim: int) -> None:
        if self._shard is not None:  # it keeps the layout it was made with: a new one is a new version
            size = self._stored_vectors().get("size")
            if size is not None and size != dim:
                raise VisrecError(
                    f"collection at {self.path} holds vectors of another size ({size}) than {dim}; "
                    "sync a new model into a new collection (VISREC_QDRANT__COLLECTION)"
                )
            return
        self.multivector = True  # every new collection takes several photos per product
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._room("create")
        with self._engine("create"):
            shard = qe.EdgeShard.create(str(self.path), self._config(dim))
        with self._adopting(shard):  # payload indexes before any optimize(): filtered queries stay exact
            self._ensure_payload_indexes()

    @property
    def place(self) -> str:
        return str(self.path)

    def _upsert(self, points: Sequence[IndexPoint]) -> None:
        if points:
            self._room("upsert")
            operation = qe.UpdateOperation.upsert_points([self._point(p) for p in points])
            with self._engine("upsert"):
                self.shard.update(operation)

    def _point(self, p: IndexPoint) -> qe.Point:
        """The binding converts the vector and payload here: what it cannot take rejects this point."""
        with engine_errors(self.path, "upsert", rejecting="point", culprit=lambda: _culprit(p)):
            return qe.Point(point_id(p.product_id), self._stored_vector(p), p.payload)

    def _delete(self, product_ids: list[str]) -> None:
        ids: list[qe.PointId] = [point_id(p) for p in product_ids]
        if ids:
            self._room("delete")
            with self._engine("delete"):
                self.shard.update(qe.UpdateOperation.delete_points(ids))

    def _scroll(
        self, filters: Filters, limit: int, after: str | None, fields: list[str] | bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        request = self._request(
            lambda f: qe.ScrollRequest(
                offset=after, limit=limit, filter=f, with_payload=fields, with_vector=False
            ),
            filters,
            (),
        )
        with self._engine("scroll"):
            page, next_id = self.shard.scroll(request)
        return [dict(r.payload or {}) for r in page], None if next_id is None else str(next_id)

    def _retrieve(
        self, product_ids: Sequence[str], *, with_payload: bool, with_vectors: bool
    ) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        ids: list[qe.PointId] = [point_id(p) for p in product_ids]
        with self._engine("retrieve"):
            # with_vector must be positional at run time, whatever the stub says.
            found = self.shard.retrieve(ids, with_payload, with_vectors)
        return [
            (
                str(r.id),
                np.atleast_2d(np.asarray(r.vector if with_vectors else [], dtype=np.float32)),
                dict(r.payload or {}),
            )
            for r in found
        ]

    def _overwrite_payloads(self, payloads: Mapping[str, dict[str, Any]]) -> None:
        if payloads:
            self._room("payload update")
        for product_id, payload in payloads.items():
            with engine_errors(self.path, "payload update", rejecting=f"point of product {product_id!r}"):
                operation = qe.UpdateOperation.overwrite_payload([point_id(product_id)], payload)
            with self._engine("payload update"):
                self.shard.update(operation)

    def unindexed_points(self) -> int:
        with self._engine("info"):
            info = self.shard.info()
        return max(0, int(info.points_count) - int(info.indexed_vectors_count))

    def _search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str], exact: bool
    ) -> list[Hit]:
        request = self._query(SearchRequest(vector, k, filters, exclude), exact)
        with self._engine("query"):
            found = self.shard.query(request)
        return [Hit.of(p.payload, p.score) for p in found]

    def _search_batch(self, requests: Sequence[SearchRequest], exact: Sequence[bool]) -> list[list[Hit]]:
        batch = qe.QueryBatchRequest([self._query(r, scan) for r, scan in zip(requests, exact, strict=True)])
        with self._engine("query"):
            found = self.shard.query_batch(batch)
        return [[Hit.of(p.payload, p.score) for p in points] for points in found]

    def _query(self, search: SearchRequest, exact: bool) -> qe.QueryRequest:
        return self._request(
            lambda f: qe.QueryRequest(
                limit=search.k,
                query=qe.Query.Nearest(self._query_vector(search.vector)),
                filter=f,
                with_payload=True if search.fields is None else [payload_key(f) for f in search.fields],
                params=qe.SearchParams(
                    hnsw_ef=self.settings.hnsw_ef,
                    exact=exact,
                    quantization=qe.QuantizationSearchParams(
                        ignore=exact, rescore=self.settings.rescore, oversampling=self.settings.oversampling
                    ),
                ),
            ),
            search.filters,
            search.exclude,
        )

    def _count(self, filters: Filters) -> int:
        request = self._request(lambda f: qe.CountRequest(exact=True, filter=f), filters, ())
        with self._engine("count"):
            return int(self.shard.count(request))

    def _facet(self, field: str, limit: int) -> list[tuple[str | bool, int]]:
        with self._engine("facet"):
            found = self.shard.facet(qe.FacetRequest(key=payload_key(field), limit=limit, exact=True))
        return [(hit.value, int(hit.count)) for hit in found.hits if isinstance(hit.value, str | bool)]

    def _request(
        self, build: Callable[[qe.Filter | None], _R], filters: Filters, exclude: Sequence[str]
    ) -> _R:
        """A request with `filters`: a filter value the binding cannot take (an int beyond 64 bits, a
        lone surrogate) is the caller's `InvalidFilter`, not a store failure."""
        with engine_errors(
            self.path, "query", rejecting="filter", culprit=lambda: repr(filters), rejected=InvalidFilter
        ):
            return build(edge_filter(filters, exclude))

    def optimize(self, *, apart: bool = False) -> None:
        if not apart:
            with self._engine("optimize"):
                self.shard.optimize()
            return
        self._close()  # the child process takes the folder's lock, then gives it back
        try:
            optimize_in_child(self.path)
        finally:
            self._shard = self._load()

    def flush(self) -> None:
        with self._engine("flush"):
            self.shard.flush()

    def copy(self) -> EdgeCopy:
        """Copy this collection's folder beside writes (`edge_copy.take_copy`); `EdgeCopy.settle`, with
        them held, makes it exact."""
        return take_copy(self.path, self.collection, self.flush, self._reopen)

    def _reopen(self, folder: Path) -> EdgeIndex:
        return EdgeIndex(self.root, self.collection, self.settings, folder=folder)

    def _close(self) -> None:
        if self._shard is not None:
            shard, self._shard = self._shard, None
            with self._engine("close"):
                try:
                    shard.flush()
                finally:
                    shard.close()


def _culprit(p: IndexPoint) -> str:
    """The product and payload field the binding refuses (tried one by one, only once it has refused)."""
    for key, value in p.payload.items():
        try:
            qe.Point(0, [0.0], {key: value})
        except (TypeError, ValueError):
            return f"product {p.product_id!r}, field {key!r}"
    return f"product {p.product_id!r}"
