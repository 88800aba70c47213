"""Model upgrades without downtime: build the next version of the collection with a new model, switch
the alias to it in one atomic step once it is complete, and roll back to the previous version."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from visrec.catalogue import Catalogue
from visrec.embed import Embedder
from visrec.errors import VisrecError
from visrec.filters import Filters
from visrec.index import Store
from visrec.ingest import ProgressFn, SyncOptions, SyncSummary, sync

log = logging.getLogger(__name__)


@dataclass
class ReindexSummary:
    previous: str  # the version that was live before
    live: str  # the version live now
    points: int
    sync: SyncSummary

    def to_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "live": self.live, "points": self.points, **self.sync.to_dict()}


def reindex(
    catalogue: Catalogue,
    store: Store,
    embedder: Embedder,
    options: SyncOptions,
    *,
    accept_failures: bool = False,
    progress: ProgressFn | None = None,
) -> ReindexSummary:
    """Build the next version of the collection with `embedder`'s model and make it live once complete.

    The version above the live one is reused if it exists (a rerun after a crash, or after a rollback,
    carries on where it stopped); the live version is never written. The switch is one atomic alias
    change, made only when the new version holds every valid product (and, unless `accept_failures`,
    no image failed). Raises `VisrecError` without switching otherwise.
    """
    live = store.live()
    newer = [v for v in store.versions() if store.generation(v) > store.generation(live)]
    if live not in store.versions():  # nothing built yet: build the first version
        target = live
    else:
        target = newer[-1] if newer else store.version(store.generation(live) + 1)
    with store.open(target) as index:  # not live: it may be rebuilt with another model in place
        summary = sync(catalogue, index, embedder, options, progress=progress, new_model=True)
        points = index.count()
    expected = len(catalogue.products) - summary.failed
    if points != expected or (summary.failed and not accept_failures):
        raise VisrecError(
            f"{target} not made live: it holds {points} points for {len(catalogue.products)} valid products, "
            f"{summary.failed} images failed (see {summary.failure_report}); fix them and rerun "
            "(or pass --accept-failures)"
        )
    store.switch(target)
    log.info("%s is live (was %s)", target, live)
    return ReindexSummary(previous=live, live=target, points=points, sync=summary)


def rollback(store: Store) -> tuple[str, str]:
    """Make the version below the live one live again; returns (was live, live now)."""
    live = store.live()
    older = [v for v in store.versions() if store.generation(v) < store.generation(live)]
    if not older:
        raise VisrecError(f"no version of {store.name!r} older than {live} to roll back to")
    store.switch(older[-1])
    return live, older[-1]


def describe(store: Store) -> dict[str, Any]:
    """What is indexed: the live version, every version, its points and the model versions that made
    them. Two counts when every point is the collection's own model (the rule: sync refuses to mix
    models); only otherwise a page-wise read of that payload field."""
    with store.open(store.live()) as index:
        points = index.count() if index.exists() else 0
        by_model: dict[str, int] = {}
        if points:
            built_by = index.metadata().get("model_version")
            if built_by and index.count(Filters(equals={"model_version": built_by})) == points:
                by_model = {built_by: points}
            else:
                by_model = dict(Counter(str(r.model_version) for r in index.sync_records().values()))
        return {
            "live_version": index.collection,
            "versions": store.versions(),
            "points": points,
            "points_by_model_version": by_model,
        }
