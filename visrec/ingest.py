"""Incremental sync of a catalogue into the index.

The index is the sync state: every point carries its product's content hash and the model version
that embedded it. A sync diffs the catalogue against that, deletes removed products, and embeds only
new and changed ones, upserting batch by batch. Point ids derive from product ids, so a run killed at
any moment is finished by running it again: nothing is duplicated, nothing done is redone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visrec import payload
from visrec.background import BackgroundWriter
from visrec.catalogue import Catalogue, Product, RowError
from visrec.colour import extract_colours
from visrec.config import Settings
from visrec.embed import EmbeddedBatch, Embedder
from visrec.errors import CatalogueError, ModelError, PointRejected, VisrecError
from visrec.fs import write_atomically
from visrec.images import ImageLimits
from visrec.index import IndexPoint, SyncRecord, VectorIndex

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (images done, images to embed)

# Part of every stored content hash: bump it when what a point carries changes (as when colour was
# added), so the next sync re-processes points made before.
PAYLOAD_VERSION = 2
PARTIAL = "+partial"  # ends the stored hash of a product indexed without some of its photos


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
class Shard:
    """Shard `index` of `count`: the products whose id hashes to it. N workers, each given one shard,
    cover the catalogue exactly once (sha256, so every machine and Python process agrees)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N; raises `VisrecError` otherwise."""
        index, sep, count = text.partition("/")
        if not (sep and index.strip().isdigit() and count.strip().isdigit()) or not 0 <= int(index) < int(
            count
        ):
            raise VisrecError(f"--shard takes i/N with 0 <= i < N (e.g. 0/4), got {text!r}")
        return cls(int(index), int(count))

    def __contains__(self, product_id: object) -> bool:
        digest = hashlib.sha256(str(product_id).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


@dataclass(frozen=True)
class SyncOptions:
    """How a sync runs, beyond what the embedder and the index decide."""

    limits: ImageLimits  # per image: bytes, pixels, how remote ones are fetched
    failure_report: Path
    max_delete: float  # the share of the shard's indexed products a sync may delete (1: any)
    shard: Shard = Shard()

    @classmethod
    def from_settings(cls, settings: Settings, shard: Shard = Shard()) -> SyncOptions:
        ingest = settings.ingest
        return cls(ImageLimits.from_settings(ingest), ingest.failure_report, ingest.max_delete, shard)


@dataclass
class SyncPlan:
    added: list[tuple[Product, str]] = field(default_factory=list)  # (product, content hash)
    updated: list[tuple[Product, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)  # would be removed, but a row could not be read
    unchanged: int = 0

    @property
    def to_embed(self) -> list[tuple[Product, str]]:
        return self.added + self.updated


@dataclass
class SyncSummary:
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0  # products none of whose photos could be read or decoded, or the store refused
    photos_skipped: int = 0  # photos refused or unreadable, of products indexed with their other photos
    invalid_rows: int = 0  # catalogue rows skipped
    deletes_held_back: int = 0  # products absent from the catalogue, kept because some row was unreadable
    seconds: float = 0.0  # the whole sync, the closing optimize() included
    optimize_seconds: float = 0.0  # of which the closing optimize(): an index cost, not an embedding one
    images_per_second: float = 0.0
    model_version: str = ""
    shard: str = "0/1"
    failure_report: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_sync(
    catalogue: Catalogue, indexed: dict[str, SyncRecord], model_version: str, shard: Shard = Shard()
) -> SyncPlan:
    """Decide what to embed and what to delete, within `shard`.

    A product is changed when its content hash or the model that embedded it differs. Deletes are
    earned: a product is deleted only when the catalogue proves it gone. One whose row is invalid this
    time is neither embedded nor deleted (a typo in a row must not drop it), and a row that could not be
    read at all, or has no usable id, could be any product: then nothing is deleted (`held_back`).
    Points of other shards are left alone.
    """
    plan = SyncPlan()
    for product in (p for p in catalogue.products if p.id in shard):
        digest = f"{PAYLOAD_VERSION}:{catalogue.content_hash(product)}"
        record = indexed.get(product.id)
        if record is None:
            plan.added.append((product, digest))
        elif record.content_hash != digest or record.model_version != model_version:
            plan.updated.append((product, digest))
        else:
            plan.unchanged += 1
    keep = {p.id for p in catalogue.products} | {e.product_id for e in catalogue.errors if e.product_id}
    gone = sorted(p for p in set(indexed) - keep if p in shard)
    if catalogue.unidentified:
        plan.held_back = gone
    else:
        plan.removed = gone
    return plan


def sync(
    catalogue: Catalogue,
    index: VectorIndex,
    embedder: Embedder,
    options: SyncOptions,
    *,
    progress: ProgressFn | None = None,
    new_model: bool = False,
) -> SyncSummary:
    """Bring the index in step with the catalogue; returns what was done.

    Bad rows, bad images and points the store refuses are written to the failure report (JSON lines,
    with the product id, the catalogue line and the reason) and skipped. Raises `CatalogueError` for a
    catalogue with no valid product, or one that would delete more than `max_delete` of the shard's
    indexed products (a truncated export must not empty the index; nothing is written then),
    `IndexUnavailable` if the store fails, `ModelError` if the artefact is unusable or, unless
    `new_model`, is not the model that built the collection (re-embedding a collection in place would
    mix two models' vectors while it is queried: `reindex` builds a new version instead).
    """
    started = time.perf_counter()
    shard, failure_report = options.shard, options.failure_report
    if not catalogue.products:
        raise CatalogueError(
            f"{catalogue.path}: no valid product (of {len(catalogue.errors)} rows); nothing synced"
        )
    manifest = embedder.manifest
    recorded = index.metadata() if index.exists() else {}
    built_by = recorded.get("model_version")
    if built_by and built_by != manifest.model_version and not new_model:
        raise ModelError(
            f"{index.collection} was built by model {built_by}, not {manifest.model_version} "
            f"({embedder.artefact_dir}): sync with that model, or change models with "
            "`visrec reindex CATALOGUE --model NEW`"
        )
    index.create(  # what else is recorded (the reindex gate's figures) stays, on every backend
        manifest.embedding_dim,
        {
            **recorded,
            "model_version": manifest.model_version,
            "artefact": str(embedder.artefact_dir.resolve()),
        },
    )
    indexed = index.sync_records()
    plan = plan_sync(catalogue, indexed, manifest.model_version, shard)
    log.info(
        "plan: %d new, %d changed, %d removed, %d unchanged",
        len(plan.added),
        len(plan.updated),
        len(plan.removed),
        plan.unchanged,
    )
    failures = _reported("row", catalogue.errors)
    _check_deletes(catalogue, plan, sum(p in shard for p in indexed), options, failures)

    failures += _reported("photo", catalogue.photo_errors)
    index.delete(plan.removed)
    todo = plan.to_embed
    photos = _PhotoGathering([catalogue.photo_refs(product) for product, _ in todo])
    done = 0
    embedded: set[int] = set()  # positions in `todo`
    rejected: dict[str, str] = {}  # product id → why the store refused its point

    def write(points: list[IndexPoint]) -> None:
        try:
            index.upsert(points)
        except PointRejected:  # one point's data: write the others, report that one
            for point in points:
                try:
                    index.upsert([point])
                except PointRejected as exc:
                    rejected[point.product_id] = str(exc)
        log.info("upserted %d points", len(points))  # logged once durable in the index

    def point(n: int, got: _Gathered) -> IndexPoint:
        product, digest = todo[n]
        return IndexPoint(
            product.id,
            np.stack(got.vectors),
            payload.build(
                product.id,
                product.metadata(),
                got.refs,
                # A photo that failed is tried again next sync: the stored hash cannot match.
                content_hash=digest if not got.errors else f"{digest}{PARTIAL}",
                model_version=manifest.model_version,
                extracted=got.extras[0],
            ),
        )

    with BackgroundWriter(write) as writer:
        for batch in embedder.embed_refs(photos.refs, options.limits, annotate=_colour_fields):
            points = []
            for n, got in photos.add(batch):
                product_id = todo[n][0].id
                kind = "photo" if got.vectors else "image"  # "photo": the product is indexed without it
                failures += [_failure(kind, catalogue, product_id, error) for error in got.errors]
                if got.vectors:
                    points.append(point(n, got))
                    embedded.add(n)
            writer.put(points)
            done += len(batch.indices) + len(batch.failures)
            if progress:
                progress(done, len(photos.refs))

    optimize_seconds = 0.0
    if embedded or plan.removed:
        # The embedded store builds its HNSW graph only when asked: at 100k points top-10 takes 19 ms
        # unoptimized, 1.5 ms after (benchmarks/query_latency.py). Small stores and servers: a no-op.
        optimizing = time.perf_counter()
        index.optimize()
        optimize_seconds = time.perf_counter() - optimizing
        log.info("index optimized in %.1f s", optimize_seconds)
    failures += [_failure("store", catalogue, product_id, error) for product_id, error in rejected.items()]
    embedded = {i for i in embedded if todo[i][0].id not in rejected}
    _write_report(failure_report, failures)
    if plan.held_back:
        log.warning(
            "%d deletes held back: %d rows could not be read or had no id (see %s)",
            len(plan.held_back),
            len(catalogue.unidentified),
            failure_report,
        )
    seconds = time.perf_counter() - started
    added = sum(i < len(plan.added) for i in embedded)  # `todo` lists the new products first
    return SyncSummary(
        added=added,
        updated=len(embedded) - added,
        deleted=len(plan.removed),
        unchanged=plan.unchanged,
        failed=len(todo) - len(embedded),
        photos_skipped=sum(f["kind"] == "photo" for f in failures),
        invalid_rows=len(catalogue.errors),
        deletes_held_back=len(plan.held_back),
        seconds=round(seconds, 3),
        optimize_seconds=round(optimize_seconds, 3),
        images_per_second=round(len(embedded) / seconds, 1) if seconds else 0.0,
        model_version=manifest.model_version,
        shard=f"{shard.index}/{shard.count}",
        failure_report=str(failure_report),
    )


def _check_deletes(
    catalogue: Catalogue, plan: SyncPlan, indexed: int, options: SyncOptions, failures: list[dict[str, Any]]
) -> None:
    """Refuse a plan that deletes more than `max_delete` of the `indexed` products (a feed job that died
    half-way looks exactly like a shop that dropped half its range): nothing is written, the rows that
    failed are reported, and `CatalogueError` says how to allow it."""
    max_delete = options.max_delete
    if len(plan.removed) <= max_delete * indexed:
        return
    _write_report(options.failure_report, failures)
    raise CatalogueError(
        f"{catalogue.path}: this sync would delete {len(plan.removed)} of the {indexed} indexed products "
        f"({len(plan.removed) / indexed:.0%}), more than --max-delete {max_delete:g} allows; nothing was "
        "changed. If the catalogue really dropped them, rerun with --max-delete 1"
    )


def _reported(kind: str, errors: list[RowError]) -> list[dict[str, Any]]:
    """Lines of the failure report for what reading the catalogue skipped (rows, or photos of kept rows)."""
    return [{"kind": kind, "line": e.line, "product_id": e.product_id, "error": e.message} for e in errors]


def _failure(kind: str, catalogue: Catalogue, product_id: str, error: str) -> dict[str, Any]:
    """A line of the failure report for one product."""
    return {"kind": kind, "line": catalogue.lines.get(product_id), "product_id": product_id, "error": error}


def _colour_fields(image: Image.Image) -> dict[str, Any]:
    """Colour extracted from the photo (runs in the loader workers, on the already decoded image)."""
    fields = extract_colours(image).payload()
    return {**fields, "colour_extracted": fields["colour"]}


def _write_report(path: Path, failures: list[dict[str, Any]]) -> None:
    """The run's failures, one JSON object a line; replaced atomically each run (empty when none)."""
    try:
        write_atomically(path, "".join(json.dumps(f) + "\n" for f in failures))
    except OSError as exc:
        raise VisrecError(f"cannot write the failure report {path}: {exc.strerror or exc}") from exc
