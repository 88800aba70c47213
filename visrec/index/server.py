"""Server backend: a Qdrant server (or cluster) through qdrant-client, by URL and API key.

`url=":memory:"` selects qdrant-client's local mode (the client's own code path and API, no server):
what the tests and the congruence check run on. Transient failures (connection errors, 5xx, 429) are
retried with bounded exponential backoff; once that runs out, `IndexUnavailable` says what happened.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, assert_never

import httpx
import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential

from visrec.config import QdrantSettings
from visrec.errors import CollectionMissing, IndexUnavailable, PointRejected, VisrecError
from visrec.filters import AnyOf, Condition, Equals, Filters, OneOf, Range
from visrec.index.base import VectorIndex
from visrec.index.points import Hit, IndexPoint, SearchRequest, payload_key, point_id
from visrec.index.store import Store
from visrec.payload import INDEXED, IndexType

log = logging.getLogger(__name__)
T = TypeVar("T")
WRITTEN = "visrec_written"  # the collection metadata key of the last write's stamp (`ServerIndex._stamp`)
SCHEMA_TYPES: dict[IndexType, qm.PayloadSchemaType] = {
    "keyword": qm.PayloadSchemaType.KEYWORD,
    "float": qm.PayloadSchemaType.FLOAT,
    "bool": qm.PayloadSchemaType.BOOL,
}


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and (exc.status_code >= 500 or exc.status_code == 429)
    return isinstance(exc, ResponseHandlingException | httpx.TransportError)


class Connection:
    """One qdrant-client and its retry policy, shared by a store and the indexes it opens."""

    def __init__(self, settings: QdrantSettings) -> None:
        url = settings.url or ":memory:"
        self.where = url
        self.local = url == ":memory:"
        if self.local:
            self.client = QdrantClient(location=":memory:")
        else:
            api_key = settings.api_key.get_secret_value() if settings.api_key else None
            self.client = QdrantClient(
                url=url, api_key=api_key, timeout=max(1, round(settings.timeout_s)), check_compatibility=False
            )
        self._retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(settings.retries),
            wait=wait_exponential(multiplier=0.2, max=10),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    def call(
        self, fn: Callable[..., T], *args: Any, collection: str = "", rejecting: str = "", **kwargs: Any
    ) -> T:
        """`fn(*args, **kwargs)` with retries, its errors translated. With `rejecting` (the request carries
        caller data, e.g. "point"), data the client cannot serialise (a string with lone surrogates) or
        the server refuses (HTTP 400/422) is `PointRejected`, so the caller can isolate it."""
        try:
            return self._retrying(fn, *args, **kwargs)
        except (TypeError, ValueError) as exc:  # raised by the client before sending: not transient
            if not rejecting:
                raise
            raise PointRejected(f"{rejecting} rejected by the store: {str(exc).splitlines()[0]}") from exc
        except UnexpectedResponse as exc:
            if rejecting and exc.status_code in (400, 422):
                raise PointRejected(
                    f"{rejecting} rejected by the store: Qdrant at {self.where} answered {exc}"
                ) from exc
            if exc.status_code == 404:
                raise CollectionMissing(f"collection {collection!r} not found on {self.where}") from exc
            if exc.status_code in (401, 403):
                raise IndexUnavailable(
                    f"Qdrant at {self.where} refused the API key ({exc.status_code})"
                ) from exc
            if _is_transient(exc):
                raise IndexUnavailable(
                    f"Qdrant at {self.where} keeps failing: HTTP {exc.status_code}"
                ) from exc
            raise VisrecError(f"Qdrant at {self.where} rejected the request: {exc}") from exc
        except (ResponseHandlingException, httpx.TransportError) as exc:
            raise IndexUnavailable(f"Qdrant at {self.where} is unreachable: {exc}") from exc

    def close(self) -> None:
        self.client.close()


class ServerStore(Store):
    """Versions as server collections `<name>__v<n>`; the alias `<name>` is a Qdrant collection alias,
    switched by one atomic alias request (so other services may query `<name>` directly)."""

    def __init__(self, settings: QdrantSettings) -> None:
        super().__init__(settings.collection)
        self.settings = settings
        self.conn = Connection(settings)
        self.conn.call(self.conn.client.get_collections)  # fail now, clearly, if unreachable

    def _collections(self) -> list[str]:
        return [c.name for c in self.conn.call(self.conn.client.get_collections).collections]

    def _alias_target(self) -> str | None:
        aliases = self.conn.call(self.conn.client.get_aliases).aliases
        return next((a.collection_name for a in aliases if a.alias_name == self.name), None)

    def _point_alias(self, collection: str) -> None:
        changes: list[qm.AliasOperations] = [
            qm.CreateAliasOperation(
                create_alias=qm.CreateAlias(collection_name=collection, alias_name=self.name)
            )
        ]
        if self._alias_target() is not None:  # delete + create in one request: atomic on the server
            changes.insert(0, qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=self.name)))
        self.conn.call(self.conn.client.update_collection_aliases, change_aliases_operations=changes)

    def _open(self, collection: str) -> ServerIndex:
        return ServerIndex(self.conn, collection, self.settings)

    def _drop(self, collection: str) -> None:
        self.conn.call(self.conn.client.delete_collection, collection)

    def close(self) -> None:
        self.conn.close()


class ServerIndex(VectorIndex):
    SCHEMA_TYPES = SCHEMA_TYPES

    def __init__(self, conn: Connection, collection: str, settings: QdrantSettings) -> None:
        self.conn = conn
        self.client = conn.client
        self.collection = collection
        self.where = conn.where
        self.settings = settings
        self._exists = self._call(self.client.collection_exists, collection)
        if self._exists:
            self.multivector = self._vector_params().multivector_config is not None
            self._repair_payload_indexes()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.conn.call(fn, *args, collection=self.collection, **kwargs)

    def _require(self) -> None:
        if not self._exists:
            raise CollectionMissing(
                f"collection {self.collection!r} not found on {self.where}: run `visrec sync`"
            )

    def exists(self) -> bool:
        return self._exists

    def _write_metadata(self, metadata: dict[str, str]) -> None:
        self._call(self.client.update_collection, self.collection, metadata=metadata)

    def metadata(self) -> dict[str, str]:
        self._require()
        info = self._call(self.client.get_collection, self.collection)
        return {k: str(v) for k, v in (info.config.metadata or {}).items() if k != WRITTEN}

    def _stamp(self) -> None:
        """A fresh random stamp in the collection's metadata (merged: the other keys stay): a separate
        ingest job writing to this server changes it too. Random, not a count: two writers never need to
        read each other's value, and never write the same one."""
        if self._exists:
            self._call(self.client.update_collection, self.collection, metadata={WRITTEN: uuid.uuid4().hex})

    def state(self) -> str:
        """The stamp the last write left (`_stamp`), read from the server each time."""
        self._require()
        info = self._call(self.client.get_collection, self.collection)
        return str((info.config.metadata or {}).get(WRITTEN, "-"))

    def _vector_params(self) -> qm.VectorParams:
        vectors = self._call(self.client.get_collection, self.collection).config.params.vectors
        if not isinstance(vectors, qm.VectorParams):  # named vectors: not a collection visrec made
            raise VisrecError(f"collection {self.collection!r} on {self.where} holds named vectors")
        return vectors

    def layout(self) -> dict[str, Any]:
        self._require()
        config = self._call(self.client.get_collection, self.collection).config
        params = config.params.vectors
        quantization = config.quantization_config
        kind = (
            "int8"
            if isinstance(quantization, qm.ScalarQuantization)
            else "binary"
            if isinstance(quantization, qm.BinaryQuantization)
            else "none"
        )
        on_disk = isinstance(params, qm.VectorParams) and bool(params.on_disk)
        return {"multivector": self.multivector, "quantization": kind, "on_disk": on_disk}

    def _create(self, dim: int) -> None:
        if self._exists:
            size = self._vector_params().size
            if size != dim:
                raise VisrecError(
                    f"collection {self.collection!r} holds vectors of size {size}, not {dim}; "
                    "sync a new model into a new collection (VISREC_QDRANT__COLLECTION)"
                )
            return
        try:
            self._call(
                self.client.create_collection,
                self.collection,
                vectors_config=qm.VectorParams(
                    size=dim,
                    distance=qm.Distance.EUCLID,
                    multivector_config=qm.MultiVectorConfig(comparator=qm.MultiVectorComparator.MAX_SIM),
                    on_disk=self.settings.vectors_on_disk,
                ),
                quantization_config=_quantization(self.settings),
                hnsw_config=qm.HnswConfigDiff(
                    m=self.settings.hnsw_m,
                    ef_construct=self.settings.hnsw_ef_construct,
                    full_scan_threshold=self.settings.full_scan_threshold_kb,
                ),
                shard_number=self.settings.shard_number,
                replication_factor=self.settings.replication_factor,
            )
        except (VisrecError, ValueError):  # the server answers 409, local mode ValueError
            # N sharded workers start together and race to create it: losing that race is fine.
            if not self._call(self.client.collection_exists, self.collection):
                raise
            self._exists = True
            self.multivector = self._vector_params().multivector_config is not None
            self._create(dim)  # checks the winner's vector size
            return
        self._exists = True
        self.multivector = True
        self._ensure_payload_indexes()

    def _payload_schema(self) -> dict[str, object]:
        if self.conn.local:  # local mode has no payload indexes (its schema stays empty): nothing to do
            return {name: SCHEMA_TYPES[kind] for name, kind in INDEXED}
        have = self._call(self.client.get_collection, self.collection).payload_schema
        return {name: index.data_type for name, index in have.items()}

    def _create_payload_index(self, name: str, kind: IndexType) -> None:
        if self.conn.local:  # it keeps none (and warns)
            return
        self._call(
            self.client.create_payload_index,
            self.collection,
            payload_key(name),
            field_schema=SCHEMA_TYPES[kind],
        )

    def _upsert(self, points: Sequence[IndexPoint]) -> None:
        self._require()
        if points:
            structs = [
                qm.PointStruct(id=point_id(p.product_id), vector=self._stored_vector(p), payload=p.payload)
                for p in points
            ]
            self._call(self.client.upsert, self.collection, points=structs, wait=True, rejecting="point")

    def _delete(self, product_ids: list[str]) -> None:
        self._require()
        ids: list[qm.ExtendedPointId] = [point_id(p) for p in product_ids]
        if ids:
            self._call(
                self.client.delete, self.collection, points_selector=qm.PointIdsList(points=ids), wait=True
            )

    def _overwrite_payloads(self, payloads: Mapping[str, dict[str, Any]]) -> None:
        self._require()
        operations: list[qm.UpdateOperation] = [
            qm.OverwritePayloadOperation(
                overwrite_payload=qm.SetPayload(payload=payload, points=[point_id(product_id)])
            )
            for product_id, payload in payloads.items()
        ]
        if operations:
            self._call(self.client.batch_update_points, self.collection, operations, wait=True)

    def _scroll(
        self, filters: Filters, limit: int, after: str | None, fields: list[str] | bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        self._require()
        page, next_id = self._call(
            self.client.scroll,
            self.collection,
            limit=limit,
            offset=after,
            scroll_filter=_server_filter(filters, ()),
            with_payload=fields,
            with_vectors=False,
        )
        return [dict(r.payload or {}) for r in page], None if next_id is None else str(next_id)

    def _retrieve(
        self, product_ids: Sequence[str], *, with_payload: bool, with_vectors: bool
    ) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        self._require()
        found = self._call(
            self.client.retrieve,
            self.collection,
            ids=[point_id(p) for p in product_ids],
            with_payload=with_payload,
            with_vectors=with_vectors,
        )
        return [
            (
                str(r.id),
                np.atleast_2d(np.asarray(r.vector if with_vectors else [], dtype=np.float32)),
                dict(r.payload or {}),
            )
            for r in found
        ]

    def _search(
        self, vector: np.ndarray, k: int, filters: Filters, exclude: Sequence[str], exact: bool
    ) -> list[Hit]:
        self._require()
        response = self._call(
            self.client.query_points,
            self.collection,
            query=self._query_vector(vector),
            query_filter=_server_filter(filters, exclude),
            limit=k,
            with_payload=True,
            search_params=self._params(exact),
        )
        return [Hit.of(p.payload, p.score) for p in response.points]

    def _search_batch(self, requests: Sequence[SearchRequest], exact: Sequence[bool]) -> list[list[Hit]]:
        self._require()
        batch = [self._query(r, scan) for r, scan in zip(requests, exact, strict=True)]
        found = self._call(self.client.query_batch_points, self.collection, requests=batch)
        return [[Hit.of(p.payload, p.score) for p in response.points] for response in found]

    def _query(self, search: SearchRequest, exact: bool) -> qm.QueryRequest:
        return qm.QueryRequest(
            query=self._query_vector(search.vector),
            filter=_server_filter(search.filters, search.exclude),
            limit=search.k,
            with_payload=True if search.fields is None else [payload_key(f) for f in search.fields],
            params=self._params(exact),
        )

    def _params(self, exact: bool) -> qm.SearchParams | None:
        """Local mode always searches exactly (and warns about search params)."""
        if self.conn.local:
            return None
        return qm.SearchParams(
            hnsw_ef=self.settings.hnsw_ef,
            exact=exact,
            quantization=qm.QuantizationSearchParams(
                ignore=exact, rescore=self.settings.rescore, oversampling=self.settings.oversampling
            ),
        )

    def _count(self, filters: Filters) -> int:
        self._require()
        result = self._call(
            self.client.count, self.collection, count_filter=_server_filter(filters, ()), exact=True
        )
        return int(result.count)

    def _facet(self, field: str, limit: int) -> list[tuple[str | bool, int]]:
        # Local mode counts every value of the field, whatever its kind; a server, those its index holds.
        self._require()
        found = self._call(self.client.facet, self.collection, payload_key(field), limit=limit, exact=True)
        return [(hit.value, int(hit.count)) for hit in found.hits if isinstance(hit.value, str | bool)]

    def optimize(self, *, apart: bool = False) -> None:
        """The server optimizes in the background by itself."""

    def _close(self) -> None:
        """The connection is the store's: `Store.close` releases it."""


def _quantization(settings: QdrantSettings) -> qm.QuantizationConfig | None:
    """The codes a new collection keeps in RAM (as the embedded backend's `_config`)."""
    if settings.quantization == "int8":
        return qm.ScalarQuantization(
            scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)
        )
    if settings.quantization == "binary":
        return qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
    return None


def _server_filter(filters: Filters, exclude: Sequence[str]) -> qm.Filter | None:
    must: list[qm.Condition] = [_condition(c) for c in filters.conditions()]
    must_not: list[qm.Condition] = (
        [qm.HasIdCondition(has_id=[point_id(p) for p in exclude])] if exclude else []
    )
    return qm.Filter(must=must, must_not=must_not) if must or must_not else None


def _condition(condition: Condition) -> qm.FieldCondition | qm.Filter:
    match condition:
        case AnyOf(field, values):
            return qm.FieldCondition(key=payload_key(field), match=qm.MatchAny(any=list(values)))
        case Range(field, gte, lte):
            return qm.FieldCondition(key=payload_key(field), range=qm.Range(gte=gte, lte=lte))
        case Equals(field, value):
            return qm.FieldCondition(key=payload_key(field), match=qm.MatchValue(value=value))
        case OneOf(field, values):
            each: list[qm.Condition] = [_one(field, value) for value in values]
            return qm.Filter(should=each) if len(each) > 1 else _one(field, values[0])
        case _:
            assert_never(condition)


def _one(field: str, value: str | bool | float) -> qm.FieldCondition:
    """A number matches as a point range: integers and floats alike (a match would take one kind)."""
    if isinstance(value, str | bool):
        return qm.FieldCondition(key=payload_key(field), match=qm.MatchValue(value=value))
    return qm.FieldCondition(key=payload_key(field), range=qm.Range(gte=value, lte=value))
