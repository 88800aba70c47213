"""The service's one writer: the jobs handed over by `visrec sync`, `reindex` and `rollback`
(`visrec.owner`) run here one at a time, on the service's own handles, while requests go on reading.

A sync writes into the live version through the handle the requests use (qdrant-edge takes reads and
writes on one handle from several threads); its model is the live pair's when it is the same artefact (no
second copy in memory). A reindex builds the next version beside the live one and reads the live one
through the service's handle for its quality gate. After each job the live pair is re-checked at once,
so a switch or a rollback is served by the next request. The closing optimize() is deferred until
`qdrant.optimize_after` points have changed (it holds the GIL: every request waits while it runs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from visrec import payload
from visrec.catalogue import Catalogue, Product, explain, rows_from_service, value_problem
from visrec.errors import CollectionMissing, InvalidQuery, NotFound, WritesBusy
from visrec.index import SyncRecord, VectorIndex
from visrec.ingest import SyncOptions, SyncSummary, sync
from visrec.jobs import Job, Progress, ReindexJob, RollbackJob, SyncJob, run_reindex, run_rollback, run_sync
from visrec.manifest import ModelHandle
from visrec.service import Service

log = logging.getLogger(__name__)


class Writer:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.lock = threading.RLock()  # one job at a time; the next command (or write) waits its turn
        self.changed_since_optimize = 0

    def run(self, job: Job, progress: Progress) -> dict[str, Any]:
        with self.lock:
            log.info("running a handed-over %s", job.command)
            try:
                match job:
                    case SyncJob():
                        return self._sync(job, progress)
                    case ReindexJob():
                        return self._reindex(job, progress)
                    case RollbackJob():
                        return run_rollback(self.service.settings, force=job.force)
            finally:
                self.service.refresh()

    def _model(self, artefact: Path) -> ModelHandle:
        """The live pair's model when the job names the same artefact, else a handle that loads its own."""
        settings = self.service.settings
        for embedder in self.service.loaded_models():
            if embedder.artefact_dir.resolve() == artefact.resolve():
                return ModelHandle(artefact, settings.embed, loaded=embedder)
        return ModelHandle(artefact, settings.embed)

    def _sync(self, job: SyncJob, progress: Progress) -> dict[str, Any]:
        settings = self.service.settings
        try:
            index = self.service.index()
            result = run_sync(job, settings, index, progress, model=self._model(job.model), optimize=False)
        except CollectionMissing:  # no collection yet: the first sync creates it, then the service opens it
            store = self.service.store()
            with store.open(store.live()) as index:  # no request reads it yet, but they must not stop
                return run_sync(
                    job, settings, index, progress, model=self._model(job.model), optimize_apart=True
                )
        self.changed(index, result["added"] + result["updated"] + result["deleted"])
        return result

    def changed(self, index: VectorIndex, points: int) -> None:
        """Count points written into the live `index` without optimize(); once there are
        `qdrant.optimize_after`, replace it by an optimized copy (made by another process: requests go
        on meanwhile, and writes wait their turn)."""
        self.changed_since_optimize += points
        if self.changed_since_optimize < self.service.settings.qdrant.optimize_after:
            return
        live = self.service.live()
        if live.index is not index:
            return
        started = time.perf_counter()
        copy = index.optimized_copy()
        if copy is not index:
            self.service.replace_index(live, copy)
        log.info(
            "%s optimized after %d changed points (%.1f s, beside the live handle)",
            index.collection,
            self.changed_since_optimize,
            time.perf_counter() - started,
        )
        self.changed_since_optimize = 0

    def _reindex(self, job: ReindexJob, progress: Progress) -> dict[str, Any]:
        try:
            live = self.service.live()
            held = {live.collection: live.index}
        except CollectionMissing:
            held = {}
        return run_reindex(job, self.service.settings, progress, held=held, model=self._model(job.model))


@dataclass
class _Rows:
    """One request's rows, waiting for the writer, and what became of them."""

    rows: list[Any]
    ids: set[str]
    done: threading.Event = field(default_factory=threading.Event)
    outcomes: list[str] = field(default_factory=list)
    error: BaseException | None = None


class ProductWrites:
    """Products written by other services (the HTTP write routes), through the service's writer: rows
    pass the catalogue's checks (`catalogue.rows_from_service`: photos as URLs only) and the one sync
    engine (`ingest.sync` with `source="api"`, no deletes), so a photo is embedded only when it changed,
    and a 2xx means the write is in the store and the next query sees it.

    Writes are jobs, not request threads: requests queue their rows, and one thread takes every request
    waiting (one row per product id a round, at most `api.max_batch_rows` rows) into one sync, so the
    photos of concurrent writes share the embedder's batches. At most `api.max_pending_writes` requests
    wait; more raise `WritesBusy` (503). A request that gives up (its deadline) leaves its rows to be
    written all the same: a write is never left half done, and a retry is idempotent."""

    def __init__(self, writer: Writer, registry: CollectorRegistry) -> None:
        self.writer = writer
        self.service = writer.service
        self.outcomes = Counter(
            "visrec_writes",
            "products written over HTTP, by route and outcome",
            ["route", "outcome"],
            registry=registry,
        )
        self.rounds = Counter(
            "visrec_write_rounds", "syncs that wrote the rows of waiting requests", registry=registry
        )
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._waiting: list[_Rows] = []
        self._arrived = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def _turn(self) -> Iterator[None]:
        with self._pending_lock:
            if self._pending >= self.service.settings.api.max_pending_writes:
                raise WritesBusy("too many writes are waiting for the writer")
            self._pending += 1
        try:
            with self.writer.lock:
                yield
        finally:
            with self._pending_lock:
                self._pending -= 1

    def rows(self, rows: list[Any]) -> list[str]:
        """Create or replace products from rows; one outcome per row, in order: "added", "updated"
        (photos changed: embedded), "metadata_updated", "unchanged", or "error: why"."""
        request = _Rows(rows, {str(row.get("id")) for row in rows if isinstance(row, dict)})
        with self._arrived:
            if len(self._waiting) >= self.service.settings.api.max_pending_writes:
                raise WritesBusy("too many writes are waiting for the writer")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_rounds, name="product-writes", daemon=True)
                self._thread.start()
            self._arrived.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.outcomes

    def _write_rounds(self) -> None:
        limit = self.service.settings.api.max_batch_rows
        while True:
            with self._arrived:
                while not self._waiting:
                    self._arrived.wait()
                taken: list[_Rows] = []
                ids: set[str] = set()
                for request in list(self._waiting):
                    rows = sum(len(r.rows) for r in taken)
                    if not taken or (not request.ids & ids and rows + len(request.rows) <= limit):
                        taken.append(request)
                        ids |= request.ids
                        self._waiting.remove(request)
            try:
                self.rounds.inc()
                outcomes = self._write([row for request in taken for row in request.rows])
                for request in taken:
                    request.outcomes, outcomes = outcomes[: len(request.rows)], outcomes[len(request.rows) :]
            except BaseException as exc:  # every request of the round is told
                for request in taken:
                    request.error = exc
            finally:
                for request in taken:
                    request.done.set()

    def _write(self, rows: list[Any]) -> list[str]:
        catalogue = rows_from_service(rows, self.service.settings.ingest)
        outcomes = {e.line: f"error: {e.message}" for e in catalogue.errors}
        if catalogue.products:
            with self.writer.lock:
                summary = self._sync(catalogue)
            for product in catalogue.products:
                outcomes[catalogue.lines[product.id]] = summary.outcomes.get(product.id, "unchanged")
        return [outcomes[n] for n in range(1, len(rows) + 1)]

    def _sync(self, catalogue: Catalogue) -> SyncSummary:
        settings = self.service.settings
        report = settings.ingest.failure_report
        options = SyncOptions(
            settings.ingest,
            report.with_name(f"{report.stem}.api{report.suffix}"),  # the file syncs' report stays theirs
            max_delete=1.0,
            optimize=False,
            source="api",
            deletes=False,
        )
        try:
            live = self.service.live()
        except CollectionMissing:  # the first products of an empty store: create it with the model
            store = self.service.store()
            with store.open(store.live()) as index:
                summary = sync(catalogue, index, ModelHandle(settings.artefact, settings.embed), options)
            self.service.refresh()
            return summary
        model = ModelHandle(live.model().artefact_dir, settings.embed, loaded=live.model())
        summary = sync(catalogue, live.index, model, options)
        self.writer.changed(live.index, summary.added + summary.updated)
        return summary

    def patch(self, product_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Merge `fields` into a product's catalogue fields (JSON merge patch: null removes a field);
        never embeds. Raises `NotFound`, `InvalidQuery` for a field it may not write."""
        problem = patch_problem(fields)
        if problem:
            raise InvalidQuery(problem)
        with self._turn():
            index = self.service.index()
            old = index.payloads([product_id]).get(product_id)
            if old is None:
                raise NotFound(f"no product {product_id!r}")
            metadata = {k: v for k, v in old.items() if k not in payload.RESERVED | {"image", "images"}}
            if "colour_extracted" in old and old.get("colour") == old["colour_extracted"]:
                metadata.pop("colour", None)  # the extracted colour, not the shop's own
            for key, value in fields.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            try:  # as a catalogue row would be: blanks are missing, text is stripped
                patched = Product.model_validate(
                    {**metadata, "id": product_id, "images": payload.photos(old)}
                )
            except ValidationError as exc:
                raise InvalidQuery(f"the patched product is not valid: {explain(exc)}") from None
            metadata = {k: v for k, v in patched.metadata().items() if k not in ("image", "images")}
            record = SyncRecord.from_payload(old)
            bookkeeping = payload.Bookkeeping(
                vectors_hash=record.vectors_hash or "",
                # No row hashes to this: the next sync of a row rewrites the payload (a catalogue's row
                # wins for the catalogue's products; a PUT replaces).
                metadata_hash="patched",
                photo_files=record.photo_files,
                model_version=record.model_version or "",
                source=record.source,
            )
            new = payload.rebuild(old, metadata, bookkeeping)
            index.overwrite_payloads({product_id: new})
            return new

    def delete(self, product_id: str) -> bool:
        """Delete a product; whether it was indexed (a repeated DELETE is not an error)."""
        with self._turn():
            index = self.service.index()
            existed = bool(index.payloads([product_id]))
            index.delete([product_id])
            return existed


def patch_problem(fields: dict[str, Any]) -> str | None:
    """Why a PATCH may not write `fields` (None: it may): photos, the id and computed fields are not its
    to change, and values must fit the index as a catalogue's must."""
    for key in fields:
        if key in ("id", "image", "images"):
            return f"{key!r} cannot be patched: PUT the whole product to change its photos"
        if not key.strip():
            return "a field needs a name"
        if key in payload.RESERVED:
            return f"{key!r} is a field visrec computes itself"
    return value_problem(fields)
