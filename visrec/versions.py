"""Model upgrades without downtime: build the next version of the collection with a new model, measure
it against the live version (the quality gate, `visrec.evaluation`), switch the alias to it in one atomic
step once it is complete and no worse, and roll back to the previous version."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from visrec import evaluation, payload
from visrec.ahead import Ahead
from visrec.catalogue import Catalogue, rows_from_service
from visrec.catchup import caught_up
from visrec.config import GateSettings
from visrec.errors import (
    IndexUnavailable,
    QualityRefused,
    Refused,
    VisrecError,
    WritesWouldBeLost,
)
from visrec.filters import Filters
from visrec.gate import GateResult, quality_gate
from visrec.handle import ModelHandle
from visrec.index import Store, VectorIndex
from visrec.index.base import ChangeLog
from visrec.index.points import SyncRecord
from visrec.ingest import ProgressFn, SyncOptions, SyncSummary, sync

log = logging.getLogger(__name__)


@dataclass
class ReindexSummary:
    previous: str  # the version that was live before
    live: str  # the version live now
    points: int
    sync: SyncSummary
    gate: GateResult | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous,
            "live": self.live,
            "points": self.points,
            **self.sync.to_dict(),
            "quality_gate": self.gate.to_dict() if self.gate else None,
        }


@dataclass(frozen=True)
class Beside:
    """A service that goes on writing into its live version while a reindex builds the next one: its
    writes are watched from before the build and caught up with before the switch (`visrec.catchup`),
    which is made, and served, with them held."""

    live: VectorIndex  # the handle the service writes into
    writes_held: Callable[[], AbstractContextManager[object]]
    switched: Callable[[], None]  # serve the switched version, or raise: called with writes still held
    version: Callable[[str], AbstractContextManager[VectorIndex]]  # the service's handle on a version
    # The new model's vectors of photos written meanwhile: the service's writes add theirs before they
    # are made, so that the last catch-up round, with writes held, embeds nothing.
    ahead: Ahead


def reindex(
    catalogue: Catalogue,
    store: Store,
    model: ModelHandle,
    options: SyncOptions,
    *,
    gate: GateSettings | None = None,
    force: bool = False,
    accept_failures: bool = False,
    progress: ProgressFn | None = None,
    held: Mapping[str, VectorIndex] | None = None,
    beside: Beside | None = None,
) -> ReindexSummary:
    """Build the next version of the collection with `embedder`'s model and make it live once complete
    and no worse than the live one.

    The version above the live one is reused if it exists (a rerun after a crash, after a refusal or
    after a rollback carries on where it stopped); the live version's points are never written. The
    switch is one atomic alias change, made only when the new version holds every valid product (and,
    unless `accept_failures`, no image failed): raises `VisrecError` without switching otherwise. Then
    the quality gate (`gate`, default `GateSettings()`) measures both versions on the same query products
    and records each one's figures in its metadata; unless `force`, raises `QualityRefused` without
    switching if the new version's P@10 or mAP@10 is more than `gate.max_quality_drop` below the live
    one's, and `IndexUnavailable` if the live version cannot be read (held by another process).
    `held`: versions this process already has open (a service's live one), read through those handles;
    `beside`: the service writing into the live version meanwhile.
    """
    changes = beside.live.watch() if beside else None  # before the HTTP products are read
    try:
        return _reindex(
            catalogue, store, model, options, gate, force, accept_failures, progress, held, beside, changes
        )
    finally:
        if changes:
            changes.close()


def _reindex(
    catalogue: Catalogue,
    store: Store,
    model: ModelHandle,
    options: SyncOptions,
    gate: GateSettings | None,
    force: bool,
    accept_failures: bool,
    progress: ProgressFn | None,
    held: Mapping[str, VectorIndex] | None,
    beside: Beside | None,
    changes: ChangeLog | None,
) -> ReindexSummary:
    live = store.live()
    newer = [v for v in store.versions() if store.generation(v) > store.generation(live)]
    if live not in store.versions():  # nothing built yet: build the first version
        target = live
    else:
        target = newer[-1] if newer else store.version(store.generation(live) + 1)
    compare = live if live != target else None  # None: the first version, nothing to compare with
    if beside and beside.live.collection != compare:
        raise VisrecError(
            f"the service writes into {beside.live.collection}, but the store's live version is {live}"
        )
    written = written_over_http(store, compare, options, held or {})
    # Not live: it may be rebuilt with another model in place (through the handle `held` has, if any);
    # beside a service, through the handle the service serves once it is switched to.
    with beside.version(target) if beside else store.opened(target, held or {}) as index:
        summary = sync(catalogue, index, model, options, progress=progress, new_model=True)
        api = _sync_written(written, index, model, options, progress)
        points = index.count()
        missing, failed = _incomplete(index, catalogue, written, summary, api)
        if missing or (failed and not accept_failures):
            lacking = f", {len(missing)} products lacking ({_some(missing)})" if missing else ""
            raise Refused(
                f"{target} not made live: it holds {points} points for {len(catalogue.products)} valid "
                f"products and {len(written.products)} written over HTTP, {failed} images "
                f"failed{lacking} "
                f"(see {summary.failure_report}); fix them and rerun (or pass --accept-failures, which "
                "leaves the failed ones out)"
            )
        summary.failed += api.failed
        started = time.perf_counter()
        result = quality_gate(store, compare, index, model.manifest, gate or GateSettings(), force, held)
        result.seconds = time.perf_counter() - started
        if result.verdict == "refused":
            assert result.live is not None and result.new is not None
            raise QualityRefused(
                f"{target} not made live: it retrieves worse than the live {live} by more than "
                f"{result.max_drop} (same-category, {result.note}): "
                f"live {live} ({result.live.model_version}): {result.live.line()}; "
                f"new {target} ({result.new.model_version}): {result.new.line()}. "
                f"{target} is kept, not live: rerun this reindex with --force to switch to it anyway "
                "(nothing is re-embedded)"
            )
        if beside is None or changes is None:
            store.switch(target)
        else:
            meanwhile = WrittenMeanwhile(
                beside.live, index, model, replace(options, optimize=False), beside.ahead
            )
            with caught_up(changes, meanwhile, beside.writes_held, meanwhile.prepare):
                store.switch(target)
                try:
                    beside.switched()
                except BaseException:  # not served: the writes that follow would go to the old version
                    store.switch(live)
                    raise
    log.info("%s is live (was %s)", target, live)
    return ReindexSummary(previous=live, live=target, points=points, sync=summary, gate=result)


def written_over_http(
    store: Store, live: str | None, options: SyncOptions, held: Mapping[str, VectorIndex]
) -> Catalogue:
    """The products written over HTTP into the `live` version (None: none yet), as rows to write again
    (their photos fetched again from their URLs). Raises `IndexUnavailable` if they cannot be read: a
    new version without them would lose them."""
    rows: list[dict[str, Any]] = []
    if live is not None:
        try:
            with store.opened(live, held) as index:
                if index.exists():
                    rows = [payload.as_row(p) for p in index.all_payloads(Filters(equals={"source": "api"}))]
        except IndexUnavailable as exc:
            raise IndexUnavailable(
                f"the products written over HTTP into {live} cannot be read ({exc}); a new version "
                "without them would lose them: rerun when the store is free"
            ) from exc
    return rows_from_service(rows, options.ingest, origin=f"{live} (products written over HTTP)")


class WrittenMeanwhile:
    """Catch-up for a version built beside the live one (`visrec.catchup`): products as the live version
    holds them now. Those gone are deleted; those written over HTTP are written again (photos fetched
    and embedded by the new model where they changed: by the writes themselves, into `ahead`, or
    `prepare`d before the writes are held; not optimized: the service's next copy does that); a
    catalogue product's fields patched over HTTP are carried over (its vectors are its catalogue photos',
    which the build embedded)."""

    def __init__(
        self, live: VectorIndex, target: VectorIndex, model: ModelHandle, options: SyncOptions, ahead: Ahead
    ) -> None:
        self.live, self.target, self.model, self.options = live, target, model, options
        self.ahead = ahead  # the new model's vectors of their photos

    def _written(self, now: Mapping[str, Mapping[str, Any]]) -> Catalogue:
        rows = [payload.as_row(p) for p in now.values() if p.get("source") == "api"]
        return rows_from_service(rows, self.options.ingest, origin="written meanwhile")

    def prepare(self, product_ids: set[str]) -> None:
        written = self._written(self.live.payloads(sorted(product_ids)))
        refs = [ref for p in written.products for ref in written.photo_refs(p)]
        self.ahead.add(written, self.model, self.options.limits, refs)

    def __call__(self, product_ids: set[str]) -> None:
        now = self.live.payloads(sorted(product_ids))
        self.target.delete(product_ids - set(now))
        written = self._written(now)
        if written.products:
            _sync_rows(written, self.target, self.model, self.options, ahead=self.ahead)
        theirs = {i: p for i, p in now.items() if p.get("source") != "api"}
        built = self.target.payloads(sorted(theirs))
        self.target.overwrite_payloads(
            {
                i: payload.patched(built[i], payload.catalogue_fields(p))
                for i, p in theirs.items()
                if i in built
            }
        )


def _sync_written(
    written: Catalogue,
    index: VectorIndex,
    model: ModelHandle,
    options: SyncOptions,
    progress: ProgressFn | None,
) -> SyncSummary:
    """Write the products written over HTTP into a version being built; those of them it holds from
    an earlier attempt and deleted since are deleted."""
    ids = {p.id for p in written.products}
    gone = [p for p, record in index.sync_records().items() if record.source == "api" and p not in ids]
    index.delete(gone)
    if not ids:
        return SyncSummary()
    return _sync_rows(written, index, model, options, progress)


def _sync_rows(
    written: Catalogue,
    index: VectorIndex,
    model: ModelHandle,
    options: SyncOptions,
    progress: ProgressFn | None = None,
    ahead: Ahead | None = None,
) -> SyncSummary:
    """Products written over HTTP, written into a version being built by its model."""
    report = options.failure_report
    return sync(
        written,
        index,
        model,
        replace(
            options,
            source="api",
            deletes=False,
            failure_report=report.with_name(f"{report.stem}.api{report.suffix}"),
        ),
        progress=progress,
        new_model=True,
        ahead=ahead,
    )


def _incomplete(
    index: VectorIndex, catalogue: Catalogue, written: Catalogue, *summaries: SyncSummary
) -> tuple[set[str], int]:
    """What a version being built lacks: the products it must hold and does not (beyond those that
    failed), and how many failed (photos, refused rows of products written over HTTP)."""
    must = {p.id for p in catalogue.products} | {p.id for p in written.products}
    failed = {p for s in summaries for p, outcome in s.outcomes.items() if outcome.startswith("error")}
    failed |= {e.product_id for e in written.errors if e.product_id is not None}
    held = set(index.sync_records())
    return (must - failed) - held, len(failed) + len(written.unidentified)


def _some(ids: set[str], shown: int = 5) -> str:
    listed = ", ".join(repr(i) for i in sorted(ids)[:shown])
    return listed + (f" and {len(ids) - shown} more" if len(ids) > shown else "") if ids else "none"


class RolledBack(NamedTuple):
    previous: str  # the version that was live
    live: str  # the version live now
    dropped: list[str]  # products that differed (written since the switch): lost by a forced rollback


def rollback(
    store: Store, *, force: bool = False, held: Mapping[str, VectorIndex] | None = None
) -> RolledBack:
    """Make the version below the live one live again. Unless `force`, raises `WritesWouldBeLost` if a
    product was written (added, changed or deleted, by a sync or over HTTP) in the live version since
    the older one was built: the older one would not have it; with `force`, says which it dropped.
    `held`: versions this process has open (a service's live one)."""
    live = store.live()
    older = [v for v in store.versions() if store.generation(v) < store.generation(live)]
    if not older:
        raise Refused(f"no version of {store.name!r} older than {live} to roll back to")
    target = older[-1]
    differ = _written_since(store, live, target, held or {})
    if differ and not force:
        raise WritesWouldBeLost(
            f"not rolled back: {len(differ)} products differ between {live} and {target} "
            f"({_some(differ)}): written since the switch (or set back to the catalogue's rows by "
            f"the reindex), {target} would serve them as they were; rerun with --force to roll back "
            "anyway (or reindex the catalogue with the older model instead)"
        )
    store.switch(target)
    if differ:
        log.warning(
            "rolled back with --force: %d products as %s had them (%s)", len(differ), target, _some(differ)
        )
    return RolledBack(live, target, sorted(differ))


def _written_since(store: Store, live: str, older: str, held: Mapping[str, VectorIndex]) -> set[str]:
    """The products that differ between two versions (`differing`), or that one of them lacks."""
    with store.opened(live, held) as index, store.opened(older, held) as other:
        return differing(index, other)


def differing(one: VectorIndex, other: VectorIndex, product_ids: Iterable[str] | None = None) -> set[str]:
    """The products whose photos, fields or owner (a catalogue, or HTTP: which later syncs may delete it)
    differ between two open versions, or that one of them lacks; among `product_ids` only, if given."""
    ids = None if product_ids is None else sorted(product_ids)
    return _differing(one, other.sync_records(ids), other.payloads, ids)


def differing_from(
    one: VectorIndex,
    records: Mapping[str, SyncRecord],
    payloads: Callable[[list[str]], Mapping[str, dict[str, Any]]],
) -> set[str]:
    """`differing` between an open version and another one's records and payloads (a snapshot's)."""
    return _differing(one, records, payloads, None)


def _differing(
    one: VectorIndex,
    records: Mapping[str, SyncRecord],
    payloads: Callable[[list[str]], Mapping[str, dict[str, Any]]],
    ids: list[str] | None,
) -> set[str]:
    now = {p: (r.vectors_hash, r.metadata_hash, r.source) for p, r in one.sync_records(ids).items()}
    before = {p: (r.vectors_hash, r.metadata_hash, r.source) for p, r in records.items()}
    differ = {p for p in now.keys() | before.keys() if now.get(p) != before.get(p)}
    # Equal photos and owner, unequal metadata hashes: the hash also says how the fields were written (a
    # PATCH records `patched:`, a reindex rewrites the row), so compare the fields themselves.
    recheck = sorted(p for p in differ if p in now and p in before and now[p][::2] == before[p][::2])
    if recheck:
        fields_now = {p: payload.catalogue_fields(v) for p, v in one.payloads(recheck).items()}
        fields_before = {p: payload.catalogue_fields(v) for p, v in payloads(recheck).items()}
        differ -= {p for p in recheck if p in fields_now and fields_now[p] == fields_before.get(p)}
    return differ


def describe(store: Store, held: Mapping[str, VectorIndex] | None = None) -> dict[str, Any]:
    """What is indexed: the live version, every version, its points and the model versions that made
    them, how the live one stores vectors, and each version's quality figures (as the reindex gate
    recorded them; None where none were). Two counts when every point is the collection's own model
    (the rule: sync refuses to mix models); only otherwise a page-wise read of that payload field.
    `held`: versions this process has open (a service's)."""
    held = held or {}
    live = store.live()
    quality: dict[str, dict[str, Any] | None] = {}
    for version in store.versions():
        if version == live:
            continue
        try:
            with store.opened(version, held) as other:
                quality[version] = evaluation.recorded(other.metadata()) if other.exists() else None
        except IndexUnavailable as exc:  # being built by a reindex: not a reason to fail the status
            quality[version] = {"problem": str(exc)}
    with store.opened(live, held) as index:
        points = index.count() if index.exists() else 0
        by_model: dict[str, int] = {}
        if points:
            built_by = index.metadata().get("model_version")
            if built_by and index.count(Filters(equals={"model_version": built_by})) == points:
                by_model = {built_by: points}
            else:
                by_model = dict(Counter(str(r.model_version) for r in index.sync_records().values()))
        by_source: dict[str, int] = {}
        if points:  # points from before sources were recorded came from catalogues
            api = index.count(Filters(equals={"source": "api"}))
            by_source = {"catalogue": points - api, "api": api}
        if index.exists():
            quality[live] = evaluation.recorded(index.metadata())
        return {
            "live_version": index.collection,
            "versions": store.versions(),
            "points": points,
            "points_by_model_version": by_model,
            "points_by_source": by_source,
            "quality": {v: quality.get(v) for v in store.versions()},
            "layout": index.layout() if index.exists() else None,
        }
