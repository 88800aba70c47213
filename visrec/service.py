"""The live (index, model) pair the HTTP service answers from, following `visrec reindex`/`rollback`.

Every `api.alias_check_s` one request looks at which collection version is live and, if it changed,
opens it and the model that built it while the others go on with the old pair; the swap is one
assignment, and the old index closes a grace period later, after requests that still hold it finish.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from visrec.artefact import artefact_for
from visrec.config import Settings
from visrec.embed import Embedder
from visrec.errors import CollectionMissing, IndexUnavailable, ModelError, VisrecError
from visrec.fetch import Fetcher
from visrec.images import ImageLimits
from visrec.index import Store, VectorIndex, open_store

log = logging.getLogger(__name__)


@dataclass
class Live:
    """The live collection version and the model that embeds photos for it: always a matching pair."""

    collection: str
    index: VectorIndex
    embedder: Embedder | None
    model_problem: ModelError | None  # why photos cannot be embedded for this version

    def model(self) -> Embedder:
        """The model for this version; raises `ModelError` if it is not available here."""
        if self.embedder is None:
            raise self.model_problem or ModelError("no model")
        return self.embedder


class Service:
    """What the routes share: settings, upload limits and the live (index, model) pair."""

    RETIRE_AFTER_S = 30.0  # far longer than any request (their timeouts are seconds)

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        # Fail fast: a request waits for the store at most one short retry, never for a held embedded
        # store (a 503 at once beats a thread held for seconds, and threads are what /healthz needs).
        self.qdrant = settings.qdrant.model_copy(
            update={"lock_wait_s": 0.0, "retries": 2, "timeout_s": settings.api.store_timeout_s}
        )
        self.limits = ImageLimits.for_uploads(settings.api)
        # Remote product photos are served through the sync's fetch guard, with one pooled client.
        self.fetch_limits = ImageLimits.from_settings(settings.ingest)
        self.fetcher = Fetcher(self.fetch_limits.fetch)
        self._store: Store | None = None
        self._live: Live | None = None
        self._checked = 0.0
        self._refreshing = False
        self._problem: VisrecError | None = None  # why there is no live pair yet
        # Pairs replaced by a switch, kept open a while for the requests that still hold them. Models are
        # held only by pairs (a model is ~100 MB: a service that followed ten reindexes must not keep ten).
        self._retired: list[tuple[float, Live]] = []
        self._lock = threading.Lock()
        self._retired_lock = threading.Lock()  # _reclaim runs under _lock or outside it

    def start(self) -> None:
        try:
            self.live()
        except VisrecError as exc:  # not ready yet: /readyz says why, routes answer 503 until it is
            log.warning("starting without being ready: %s", exc)

    def live(self) -> Live:
        """The live pair, refreshed at most every `alias_check_s` by one request, which alone waits for
        the store (no lock is held meanwhile). Until there is a pair, the others are told at once:
        raises `IndexUnavailable` (a 503)."""
        with self._lock:
            current = self._live
            due = time.monotonic() - self._checked >= self.settings.api.alias_check_s
            if not due or self._refreshing:
                if current is None:  # the last attempt's reason, until the next one is due
                    raise self._problem or IndexUnavailable("the index is being opened")
                return current
            self._refreshing = True
        try:
            fresh = self._open_live(current)
        except VisrecError as exc:
            if current is None:  # not ready yet: this request says why; one retry per alias_check_s
                self._problem = exc
                raise
            log.warning("could not check the live collection: %s", exc)  # keep serving the pair we have
            fresh = current
        finally:
            with self._lock:
                self._refreshing = False
                self._checked = time.monotonic()
        with self._lock:
            self._swap(fresh)
            return fresh

    def index(self) -> VectorIndex:
        return self.live().index

    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.qdrant)
        return self._store

    def refresh(self) -> None:
        """Look at the live version now (after this process switched it), not at the next check."""
        with self._lock:
            self._checked = 0.0
        try:
            self.live()
        except VisrecError as exc:
            log.warning("after the job, the live collection cannot be opened: %s", exc)

    def replace_index(self, old: Live, index: VectorIndex) -> None:
        """Serve `old`'s collection from `index` (an optimized copy) from now on; `old`'s handle is
        retired like a switched version's, closed once the requests holding it are done."""
        with self._lock:
            self._swap(Live(old.collection, index, old.embedder, old.model_problem))

    def loaded_models(self) -> list[Embedder]:
        """The models in memory (the live pair's and the retired pairs')."""
        return self._models()

    def _open_live(self, current: Live | None = None) -> Live:
        store = self.store()
        target = store.live()
        # The pair we have, or a retired one of the target (a rollback soon after a switch: reused, since
        # the embedded engine admits one open handle per folder).
        known = current if current is not None and current.collection == target else self._reclaim(target)
        if known is not None:
            # A model that failed to load is retried at each check: the artefact may have arrived.
            return known if known.embedder is not None else self._with_model(target, known.index)
        index = store.open(target)
        if not index.exists():
            index.close()
            raise CollectionMissing("the collection does not exist yet: run `visrec sync`")
        return self._with_model(target, index)

    def _with_model(self, target: str, index: VectorIndex) -> Live:
        """`index` paired with the model that built it, or with the reason it cannot be loaded."""
        try:
            artefact = artefact_for(index.metadata(), self.settings.artefact)
            embedder = next((m for m in self._models() if m.artefact_dir == artefact), None)
            if embedder is None:
                embedder = Embedder(artefact, self.device, self.settings.embed)
                embedder.load()
            return Live(target, index, embedder, None)
        except ModelError as exc:  # product queries still work; photo queries answer 503 with this
            log.error("%s", exc)
            return Live(target, index, None, exc)

    def _reclaim(self, collection: str) -> Live | None:
        """The retired pair of `collection`, taken back from the retired ones, if it is still open."""
        with self._retired_lock:
            for entry in self._retired:
                if entry[1].collection == collection:
                    self._retired.remove(entry)
                    return entry[1]
        return None

    def _models(self) -> list[Embedder]:
        """The models loaded: the live pair's and the retired pairs'."""
        with self._retired_lock:
            pairs = [*([self._live] if self._live else []), *(live for _, live in self._retired)]
        return [pair.embedder for pair in pairs if pair.embedder is not None]

    def models(self) -> set[Path]:
        """The artefacts whose models are loaded."""
        return {model.artefact_dir for model in self._models()}

    def _swap(self, fresh: Live) -> None:
        """Make `fresh` live (under the lock); close indexes retired long enough ago."""
        now = time.monotonic()
        if self._live is not None and fresh.index is not self._live.index:  # not a model retry
            log.info("live collection: %s → %s", self._live.collection, fresh.collection)
            with self._retired_lock:
                self._retired.append((now, self._live))
        self._live = fresh
        with self._retired_lock:
            for entry in [r for r in self._retired if now - r[0] >= self.RETIRE_AFTER_S]:
                entry[1].index.close()
                self._retired.remove(entry)

    def close(self) -> None:
        self.fetcher.close()
        for _, retired in self._retired:
            retired.index.close()
        if self._live is not None:
            self._live.index.close()
        if self._store is not None:
            self._store.close()
