"""Incremental sync of a catalogue into the index: carry out what `visrec.plan` decided.

The index is the sync state: every point records what decided its vectors and what decided the rest of
its payload (`visrec.plan`). A sync deletes removed products, rewrites in place the payloads of products
whose catalogue fields alone changed, and embeds only new products and changed photos, upserting batch
by batch. Point ids derive from product ids, so a run killed at any moment is finished by running it
again: nothing is duplicated, nothing done is redone. The model (and torch) loads only when a photo
needs embedding. The same function serves `visrec sync` and a sync handed to a running service.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visrec import payload
from visrec.ahead import Ahead, embed_photos
from visrec.background import BackgroundWriter
from visrec.catalogue import Catalogue
from visrec.config import IngestSettings, Settings
from visrec.errors import CatalogueError, ModelError, PointRejected
from visrec.handle import ModelHandle
from visrec.index import IndexPoint, SyncRecord, VectorIndex
from visrec.plan import PAYLOAD_VERSION, Desired, Shard, SyncPlan, partial_hash, plan_sync
from visrec.sync_summary import SyncSummary, failure, reported, summarize, write_report

if TYPE_CHECKING:  # torch: imported only once a photo needs embedding
    from visrec.embed import EmbeddedBatch
    from visrec.images import ImageLimits

__all__ = [
    "PAYLOAD_VERSION",
    "Shard",
    "SyncOptions",
    "SyncSummary",
    "Writing",
    "embed_ahead",
    "sync",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (images done, images to embed)
# A service's writer: one unit of writes holds it, on the live version of that moment (`Writer.writing`).
Writing = Callable[[], AbstractContextManager[VectorIndex]]
REWRITE_PAGE = 256  # payloads read and rewritten at a time
FIRST_REASONS = 3  # why rows were refused, said in the error when none could be synced


@dataclass
class _Gathered:
    """What became of one product's photos: the vectors of those that embedded (in catalogue order) and
    why the others failed."""

    refs: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class _PhotoGathering:
    """Every photo of the products to embed, as one list of refs for the embedder, and the products
    whose photos are all accounted for after each batch (batches come in input order, so a product is
    complete once a batch reaches its last photo)."""

    def __init__(self, products: Sequence[Sequence[str]]) -> None:
        self.refs = [ref for refs in products for ref in refs]
        self.owner = [n for n, refs in enumerate(products) for _ in refs]
        self.last = [*itertools.accumulate(len(refs) for refs in products)]  # one past each one's last photo
        self._gathered = [_Gathered() for _ in products]
        self._next = 0  # the first product not yet complete

    def add(self, batch: EmbeddedBatch) -> Iterator[tuple[int, _Gathered]]:
        """Record a batch; yields (product position, what it got) for each product it completes."""
        for i, vector, extra in zip(batch.indices, batch.vectors, batch.extras, strict=True):
            got = self._gathered[self.owner[i]]
            got.refs.append(self.refs[i])
            got.vectors.append(vector)
            got.extras.append(extra)
        for i, error in batch.failures:
            self._gathered[self.owner[i]].errors.append(error)
        reached = max([*batch.indices, *(i for i, _ in batch.failures)], default=-1) + 1
        while self._next < len(self._gathered) and self.last[self._next] <= reached:
            yield self._next, self._gathered[self._next]
            self._gathered[self._next] = _Gathered()  # free the vectors once handed on
            self._next += 1


@dataclass(frozen=True)
class SyncOptions:
    """How a sync runs, beyond what the model and the index decide."""

    ingest: IngestSettings  # per image: bytes, pixels, how remote ones are fetched
    failure_report: Path
    max_delete: float  # the share of the shard's indexed products a sync may delete (1: any)
    shard: Shard = Shard()
    checksum: bool = False  # hash every local photo, not only those whose size or time changed
    optimize: bool = True  # end with optimize(); a service defers it (it would stop every thread)
    optimize_apart: bool = False  # optimize in a process of its own (a service building a new version)
    source: str = "catalogue"  # who owns the rows' products from now on (visrec.payload.SOURCES)
    deletes: bool = True  # False: only the rows' products are touched (rows written over HTTP)

    @classmethod
    def from_settings(
        cls, settings: Settings, shard: Shard = Shard(), *, checksum: bool = False
    ) -> SyncOptions:
        ingest = settings.ingest
        return cls(ingest, ingest.failure_report, ingest.max_delete, shard, checksum)

    @property
    def limits(self) -> ImageLimits:
        from visrec.images import ImageLimits

        return ImageLimits.from_settings(self.ingest)


def sync(
    catalogue: Catalogue,
    index: VectorIndex | Writing,
    model: ModelHandle,
    options: SyncOptions,
    *,
    progress: ProgressFn | None = None,
    new_model: bool = False,
    ahead: Ahead | None = None,
) -> SyncSummary:
    """Bring the index in step with the catalogue; returns what was done.

    `index` is the index, or a service's `Writing`: then the sync writes in units, each holding the writer
    on the live version of its moment: one for the plan with its deletes and payload rewrites (the plan
    holds only while nothing else writes), then one per batch of upserts. Other writes go on between them,
    while photos embed: a product written since the plan read its record (deleted, rewritten or upserted
    by another write) is left as that write made it, as if it came after the sync. `ahead`: photos
    embedded before (`embed_ahead`).

    Bad rows, bad images and points the store refuses are written to the failure report (JSON lines,
    with the product id, the catalogue line and the reason) and skipped. Raises `CatalogueError` for a
    catalogue with no valid product, or one that would delete more than `max_delete` of the shard's
    indexed products (a truncated export must not empty the index; nothing is written then),
    `IndexUnavailable` if the store fails, `ModelError` if the artefact is unusable or, unless
    `new_model`, is not the model that built the collection (re-embedding a collection in place would
    mix two models' vectors while it is queried: `reindex` builds a new version instead).
    """
    started = time.perf_counter()
    if not catalogue.products:  # the reasons are the user's only lead: the report, and the first ones here
        failures = reported("row", catalogue.errors)
        write_report(options.failure_report, failures)
        first = "; ".join(f"line {f['line']}: {f['error']}" for f in failures[:FIRST_REASONS])
        raise CatalogueError(
            f"{catalogue.path}: no valid product (of {len(catalogue.errors)} rows); nothing synced"
            + (f". {first}" if first else "")
            + (f"; all in {options.failure_report.absolute()}" if len(failures) > FIRST_REASONS else "")
        )
    writing: Writing = (lambda: nullcontext(index)) if isinstance(index, VectorIndex) else index
    beside_others = not isinstance(index, VectorIndex)  # a service's writer: other writes come between
    plan, failures, planned = _plan_and_delete(catalogue, writing, model, options, new_model, beside_others)
    rejected: dict[str, str] = {}  # product id → why the store refused its point
    _rewrite_payloads(writing, plan, planned if beside_others else None, rejected)
    embedded = _embed_and_write(
        catalogue,
        writing,
        model,
        options,
        plan.to_embed,
        (failures, rejected),
        progress,
        ahead,
        planned if beside_others else None,
    )

    optimize_seconds = 0.0
    if options.optimize and (embedded or plan.removed):
        # The embedded store builds its HNSW graph only when asked: at 100k points top-10 takes 19 ms
        # unoptimized, 1.5 ms after (benchmarks/query_latency.py). Small stores and servers: a no-op.
        optimizing = time.perf_counter()
        with writing() as written:
            written.optimize(apart=options.optimize_apart)
        optimize_seconds = time.perf_counter() - optimizing
        log.info("index optimized in %.1f s", optimize_seconds)
    return summarize(
        catalogue,
        plan,
        embedded,
        failures,
        rejected,
        options.shard,
        options.failure_report,
        started,
        optimize_seconds,
        model,
    )


def _plan_and_delete(
    catalogue: Catalogue,
    writing: Writing,
    model: ModelHandle,
    options: SyncOptions,
    new_model: bool,
    beside_others: bool,
) -> tuple[SyncPlan, list[dict[str, Any]], dict[str, SyncRecord]]:
    """Plan the sync against what the index holds and carry out its deletes; returns the plan, the
    failures so far (rows, photos) and the records the plan read. Raises as `sync` says, before anything
    is written. Beside other writes, the records are read a page per unit and the plan is made with the
    writer free; a product written since its record was read is not deleted (nor rewritten: see
    `_rewrite_payloads`)."""
    manifest, shard = model.manifest, options.shard
    with writing() as index:
        recorded = index.metadata() if index.exists() else {}
        built_by = recorded.get("model_version")
        if built_by and built_by != manifest.model_version and not new_model:
            raise ModelError(
                f"{index.collection} was built by model {built_by}, not {manifest.model_version} "
                f"({model.artefact_dir}): sync with that model, or change models with "
                "`visrec reindex CATALOGUE --model NEW`"
            )
        index.create(  # what else is recorded (the reindex gate's figures) stays, on every backend
            manifest.embedding_dim,
            {
                **recorded,
                "model_version": manifest.model_version,
                "artefact": str(model.artefact_dir.resolve()),
            },
        )
        if not options.deletes:  # rows alone (no deletes) need only their own products' records
            indexed = index.sync_records([p.id for p in catalogue.products])
    if options.deletes:
        indexed = _all_records(writing)
    plan = plan_sync(
        catalogue,
        indexed,
        manifest.model_version,
        shard,
        checksum=options.checksum,
        source=options.source,
        deletes=options.deletes,
    )
    log.info(
        "plan: %d new, %d photos changed, %d metadata changed, %d removed, %d unchanged (%d bytes of "
        "photos read to hash them)",
        len(plan.added),
        len(plan.updated),
        len(plan.repayload),
        len(plan.removed),
        plan.unchanged + len(plan.refresh),
        plan.photo_bytes_hashed,
    )
    failures = reported("row", catalogue.errors)
    owned = sum(p in shard and r.source == options.source for p, r in indexed.items())
    _check_deletes(catalogue, plan, owned, options, failures)

    failures += reported("photo", catalogue.photo_errors)
    with writing() as index:
        if beside_others and plan.removed:
            now = index.sync_records(plan.removed)
            plan.removed = [p for p in plan.removed if p not in now or now[p] == indexed.get(p)]
        index.delete(plan.removed)
    return plan, failures, indexed


def _all_records(writing: Writing) -> dict[str, SyncRecord]:
    """Every product's record, a page per unit of the writer (each a short hold of it)."""
    records: dict[str, SyncRecord] = {}
    after: str | None = None
    while True:
        with writing() as index:
            page, after = index.sync_records_page(after)
        records |= page
        if after is None:
            return records


def _isolating(
    write: Callable[[list[Any]], None], key: Callable[[Any], str], rejected: dict[str, str]
) -> Callable[[list[Any]], None]:
    """`write` for a batch; when the store refuses one item's data (`PointRejected`), the others are
    written one by one and the refused ones recorded in `rejected` (product id → why)."""

    def isolating(items: list[Any]) -> None:
        try:
            write(items)
        except PointRejected:
            for item in items:
                try:
                    write([item])
                except PointRejected as exc:
                    rejected[key(item)] = str(exc)

    return isolating


def _rewrite_payloads(
    writing: Writing, plan: SyncPlan, planned: dict[str, SyncRecord] | None, rejected: dict[str, str]
) -> None:
    """Rewrite in place the payloads of the products whose vectors stand (metadata changed, records
    refreshed): what came from the photos is kept, nothing is embedded and no optimize() is needed. A
    page at a time, each a unit of its own beside other writes (`planned`: the records the plan read;
    None when nothing else writes): a product written since the plan (its record changed) is left as
    that write made it, as if it came after the sync."""
    todo, overtaken = plan.to_rewrite, 0
    for start in range(0, len(todo), REWRITE_PAGE):
        with writing() as index:
            page = todo[start : start + REWRITE_PAGE]
            if planned is not None:
                now = index.sync_records([d.product.id for d in page])
                kept = [d for d in page if now.get(d.product.id) == planned.get(d.product.id)]
                overtaken += len(page) - len(kept)
                page = kept
            old = index.payloads([d.product.id for d in page])
            write = _isolating(
                lambda items: index.overwrite_payloads(dict(items)), lambda item: str(item[0]), rejected
            )
            write(
                [
                    (d.product.id, payload.rebuild(old[d.product.id], d.product.metadata(), d.bookkeeping))
                    for d in page
                    if d.product.id in old
                ]
            )
    if todo:
        log.info("rewrote %d payloads in place (%d written meanwhile, left as written)", len(todo), overtaken)


def _embed_and_write(
    catalogue: Catalogue,
    writing: Writing,
    model: ModelHandle,
    options: SyncOptions,
    todo: list[Desired],
    reports: tuple[list[dict[str, Any]], dict[str, str]],
    progress: ProgressFn | None,
    ahead: Ahead | None,
    planned: dict[str, SyncRecord] | None,
) -> set[int]:
    """Embed the photos of `todo` and upsert each product once its photos are in (index writes overlap
    with embedding); returns the positions in `todo` that were written. The model loads here, and only
    if there is a photo to embed. `planned`: the records the plan read, when other writes come between
    the units (None when nothing else writes): a product written since (its record changed: a PUT, a
    PATCH, a DELETE) is left as that write made it, as if it came after the sync."""
    failures, rejected = reports
    photos = _PhotoGathering([catalogue.photo_refs(d.product) for d in todo])
    if not photos.refs:
        return set()
    embedded: set[int] = set()
    overtaken: set[str] = set()
    done = 0
    version = model.manifest.model_version

    def point(n: int, got: _Gathered) -> IndexPoint:
        desired = todo[n]
        record = desired.bookkeeping
        if got.errors:  # a photo that failed is tried again next sync: the recorded hash cannot match
            record = replace(record, vectors_hash=partial_hash(record.vectors_hash, got.refs))
        return IndexPoint(
            desired.product.id,
            np.stack(got.vectors),
            payload.build(
                desired.product.id,
                desired.product.metadata(),
                got.refs,
                bookkeeping=replace(record, model_version=version),
                extracted=got.extras[0],
            ),
        )

    def write(points: list[IndexPoint]) -> None:
        with writing() as index:
            if planned is not None:
                now = index.sync_records([p.product_id for p in points])
                changed = {p.product_id for p in points if now.get(p.product_id) != planned.get(p.product_id)}
                overtaken.update(changed)
                points = [p for p in points if p.product_id not in changed]
            _isolating(index.upsert, lambda p: p.product_id, rejected)(points)
        log.info("upserted %d points", len(points))  # logged once durable in the index

    if ahead and ahead.model_version == version:  # the rest of the photos embedded here, then all at once
        ahead.add(catalogue, model, options.limits, photos.refs)
        batches: Iterable[EmbeddedBatch] = [ahead.batch(photos.refs)]
    else:
        batches = embed_photos(catalogue, model, options.limits, photos.refs)
    with BackgroundWriter(write) as writer:
        for batch in batches:
            points = []
            for n, got in photos.add(batch):
                product_id = todo[n].product.id
                kind = "photo" if got.vectors else "image"  # "photo": the product is indexed without it
                failures += [failure(kind, catalogue, product_id, error) for error in got.errors]
                if got.vectors:
                    points.append(point(n, got))
                    embedded.add(n)
            writer.put(points)
            done += len(batch.indices) + len(batch.failures)
            if progress:
                progress(done, len(photos.refs))
    if overtaken:
        log.info("%d products written meanwhile, left as written", len(overtaken))
    return {n for n in embedded if todo[n].product.id not in overtaken}


def embed_ahead(catalogue: Catalogue, index: VectorIndex, model: ModelHandle, options: SyncOptions) -> Ahead:
    """Embed the photos that a sync of the catalogue's rows (no deletes) would embed now, planned on their
    records read without the writer: the sync under the writer plans again and embeds whatever this
    missed (a write that came between, a model that changed)."""
    version = model.manifest.model_version
    records = index.sync_records([p.id for p in catalogue.products])
    plan = plan_sync(catalogue, records, version, options.shard, source=options.source, deletes=False)
    ahead = Ahead(version)
    ahead.add(
        catalogue,
        model,
        options.limits,
        [ref for d in plan.to_embed for ref in catalogue.photo_refs(d.product)],
    )
    return ahead


def _check_deletes(
    catalogue: Catalogue, plan: SyncPlan, indexed: int, options: SyncOptions, failures: list[dict[str, Any]]
) -> None:
    """Refuse a plan that deletes more than `max_delete` of the `indexed` products (a feed job that died
    half-way looks exactly like a shop that dropped half its range): nothing is written, the rows that
    failed are reported, and `CatalogueError` says how to allow it."""
    max_delete = options.max_delete
    if len(plan.removed) <= max_delete * indexed:
        return
    write_report(options.failure_report, failures)
    raise CatalogueError(
        f"{catalogue.path}: this sync would delete {len(plan.removed)} of the {indexed} indexed products "
        f"({len(plan.removed) / indexed:.0%}), more than --max-delete {max_delete:g} allows; nothing was "
        "changed. If the catalogue really dropped them, rerun with --max-delete 1"
    )
