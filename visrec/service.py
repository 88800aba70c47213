"""What the HTTP service's routes share: settings, upload limits, and the live (index, model) pair
(`visrec.live`), following `visrec reindex`/`rollback` and the writer's optimized copies.

Every `api.alias_check_s` one request looks at which place the live version is in and, if it changed,
opens it and the model that built it while the others go on with the old pair, then publishes the new
pair only if no one replaced the old one meanwhile. Routes read through `reading()`: the handle they
were given stays open until they are done, however long they read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from visrec.artefact import artefact_for
from visrec.config import Settings
from visrec.embed import Embedder
from visrec.errors import CollectionMissing, IndexUnavailable, ModelError, VisrecError
from visrec.fetch import Fetcher
from visrec.images import ImageLimits
from visrec.index import Store, VectorIndex, open_store
from visrec.jobs import Progress, StatusJob
from visrec.live import Live, LiveState
from visrec.reads import ReadJob, run_read
from visrec.versions import describe

log = logging.getLogger(__name__)


class Service:
    """What the routes share: settings, upload limits and the live (index, model) pair."""

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
        self.state = LiveState(self.store)
        self._checked = 0.0
        self._refreshing = False
        self._problem: VisrecError | None = None  # why there is no live pair yet
        self._lock = threading.Lock()  # the refresh's schedule (the pair itself is `state`'s)

    def start(self) -> None:
        """Remove what a crash left in the store, then open the live pair (or say why not)."""
        try:
            self.state.sweep()
        except (OSError, VisrecError) as exc:
            log.warning("could not look for leftovers in the store: %s", exc)
        try:
            self._refresh()
        except VisrecError as exc:  # not ready yet: /readyz says why, routes answer 503 until it is
            log.warning("starting without being ready: %s", exc)

    @contextmanager
    def reading(self) -> Iterator[Live]:
        """The live pair, held (open) until the block ends: raises `IndexUnavailable` (a 503) until
        there is one. Looks at the store first when `alias_check_s` has passed."""
        self._refresh()
        with self.state.lease() as pair:
            yield pair

    def live(self) -> Live:
        """The live pair, at a glance (not held: for checks, not for reading through)."""
        self._refresh()
        pair = self.state.live
        if pair is None:
            raise self._problem or IndexUnavailable("the index is being opened")
        return pair

    def read(self, job: ReadJob, progress: Progress) -> dict[str, Any]:
        """A reading command handed over (`visrec.reads`): on the live version, held for the job (a
        swap meanwhile retires it after), beside writes; never through the writer."""
        if isinstance(job, StatusJob):
            with self.state.holding() as held:
                return describe(self.store(), held)
        with self.reading() as live:
            return run_read(job, live.index, self.settings, live.model, progress)

    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.qdrant)
        return self._store

    def refresh(self) -> None:
        """Look at the live version now (after this process switched it), not at the next check."""
        with self._lock:
            self._checked = 0.0
        try:
            self._refresh()
        except VisrecError as exc:
            log.warning("after the job, the live collection cannot be opened: %s", exc)

    def _refresh(self) -> None:
        """If a check is due, one caller (alone: the others go on with the pair there is) opens the
        live version's place if it moved and publishes it in place of the pair it saw. Raises the
        reason there is no pair, until there is one."""
        with self._lock:
            due = time.monotonic() - self._checked >= self.settings.api.alias_check_s
            if not due or self._refreshing:
                if self.state.live is None:  # the last attempt's reason, until the next one is due
                    raise self._problem or IndexUnavailable("the index is being opened")
                return
            self._refreshing = True
        current = self.state.live
        try:
            fresh = self._open_live(current)
            if fresh is not current and not self.state.publish(fresh, current):
                self.state.release(fresh.index)  # a writer's swap came first: it stands
        except VisrecError as exc:
            if current is None:  # not ready yet: this request says why; one retry per alias_check_s
                self._problem = exc
                raise
            log.warning("could not check the live collection: %s", exc)  # keep serving the pair we have
        finally:
            with self._lock:
                self._refreshing = False
                self._checked = time.monotonic()

    def serve_switched(self) -> None:
        """Serve the version the store names now (a job has just switched it), at once: called with
        writes held, so that no write goes to the version it left. A request's refresh under way cannot
        make this a no-op (it publishes the same handle, or nothing). Raises `IndexUnavailable` if the
        named version is not what is served afterwards."""
        current = self.state.live
        fresh = self._open_live(current)
        if fresh is not current and not self.state.publish(fresh, current):
            self.state.release(fresh.index)  # a request's refresh published it first
        store = self.store()
        live = self.state.live
        if live is None or live.index.place != store.place(store.live()):
            raise IndexUnavailable(f"{store.live()} is not served after the switch")

    def replace(self, old: Live, index: VectorIndex) -> bool:
        """Serve `old`'s collection from `index` (an optimized copy, held by the caller, its place named
        by the collection's pointer now) in place of `old`; False if `old` was no longer live."""
        return self.state.publish(Live(old.collection, index, old.embedder, old.model_problem), old)

    def loaded_models(self) -> list[Embedder]:
        """The models in memory (the live pair's and those of pairs still held)."""
        return self.state.models()

    def models(self) -> set[Path]:
        """The artefacts whose models are loaded."""
        return {model.artefact_dir for model in self.state.models()}

    def _open_live(self, current: Live | None) -> Live:
        """The pair for the version live in the store now, held: `current` if it is still in that
        place with its model, else the handle held on that place (a rollback soon after a switch) or a
        new one, paired with its model."""
        store = self.store()
        target = store.live()
        place = store.place(target)
        if current is not None and current.index.place == place and current.embedder is not None:
            return current
        index = self.state.hold(place, lambda: store.open(target))
        try:
            if not index.exists():
                raise CollectionMissing("the collection does not exist yet: run `visrec sync`")
            return self._with_model(target, index)
        except BaseException:
            self.state.release(index)
            raise

    def _with_model(self, target: str, index: VectorIndex) -> Live:
        """`index` paired with the model that built it, or with the reason it cannot be loaded."""
        try:
            artefact = artefact_for(index.metadata(), self.settings.artefact)
            embedder = next((m for m in self.state.models() if m.artefact_dir == artefact), None)
            if embedder is None:
                embedder = Embedder(artefact, self.device, self.settings.embed)
                embedder.load()
            return Live(target, index, embedder, None)
        except ModelError as exc:  # product queries still work; photo queries answer 503 with this
            log.error("%s", exc)
            return Live(target, index, None, exc)

    def close(self) -> None:
        self.fetcher.close()
        self.state.close()
        if self._store is not None:
            self._store.close()
