"""The service's writer: the jobs handed over by `visrec sync`, `reindex` and `rollback` (`visrec.owner`)
and the HTTP writes, on the service's own handles, while requests go on reading.

Two locks, always taken in this order: `jobs` runs one handed-over job at a time; `lock` is held by one
unit of writes at a time, and only to decide and write: an HTTP write (its photos are fetched and
embedded before, `ingest.embed_ahead`), one unit of a sync's (`Writer.writing`: the plan with its
deletes and payload rewrites, then each batch of upserts: other writes go on while its photos embed), a
reindex's last catch-up round and switch (`versions.Beside`; its whole run when no version is served
yet), a rollback, the optimized copy's two short steps below.

A sync writes into the live version through the handle the requests use (qdrant-edge takes reads and
writes on one handle from several threads); its model is the live pair's when it is the same artefact (no
second copy in memory). A reindex builds the next version beside the live one and reads the live one
through the service's handle for its quality gate. After each job the live pair is re-checked at once,
so a switch or a rollback is served by the next request.

optimize() holds the GIL (every request would wait while it runs), so the service never runs it in its
own process: once `qdrant.optimize_after` points have changed, a maintenance thread replaces the live
version by an optimized copy. The copy is taken beside writes (a sparse copy of the folder); writes
wait only while it is settled (the last flush, then rewriting what changed since: `fs.match_tree`, in a
process of its own, `visrec.fs_apart`, where the requests' searches cannot stall it on the GIL). A
child process optimizes it while they go on into the live version, then it is caught up with them
(`visrec.catchup`: the last round with writes held, the switch inside it). A copy that
fails changes nothing a write was told: it is logged, counted in /metrics and tried again later, each
time later (up to `MAX_BACKOFF_S`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from visrec.ahead import Ahead
from visrec.catchup import caught_up, copy_points
from visrec.errors import CollectionMissing, VisrecError
from visrec.handle import ModelHandle
from visrec.index import VectorIndex
from visrec.jobs import (
    Progress,
    ReindexJob,
    RestoreJob,
    RollbackJob,
    SnapshotJob,
    SyncJob,
    WriteJob,
    run_reindex,
    run_restore,
    run_rollback,
    run_snapshot,
    run_snapshot_apart,
    run_sync,
)
from visrec.live import Live
from visrec.service import Service
from visrec.snapshot import CUT_COPY, Cut, Serving, version_record
from visrec.versions import Beside

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 5.0  # a failed copy (a full disk) is tried again after this, then twice as long each time
MAX_BACKOFF_S = 600.0


class FairLock:
    """A reentrant lock granted in the order it was asked for. A job writes unit after unit, releasing the
    writer and taking it again at once; Python's own locks are not fair (the thread that releases one
    mostly takes it again before a waiting thread wakes), and a PATCH waited 2-7 s through a sync's
    hundred short units. Here a waiting write gets the next turn."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._asked = 0  # turns handed out
        self._serving = 0  # the turn that may hold it now

    def __enter__(self) -> FairLock:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return self
            turn, self._asked = self._asked, self._asked + 1
            self._changed.wait_for(lambda: self._serving == turn)
            self._owner, self._depth = me, 1
            return self

    @property
    def asked(self) -> int:
        """How many turns were asked for so far (the holder's included)."""
        return self._asked

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._changed.notify_all()


class _Dropped(VisrecError):
    """An optimized copy that must not go live (it would replace a handle that changed or is watched)."""


class Writer:
    def __init__(self, service: Service, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.jobs = threading.Lock()  # one handed-over job at a time; the next command waits its turn
        self.lock = FairLock()  # one unit of writes at a time, taken in turn
        # Under `lock`: the points changed since the live version was last optimized, and the copy's plan.
        self.changed_since_optimize = 0
        self._copying: threading.Thread | None = None
        self._retry_at = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._closed = False
        self._reindexing = False  # under `lock`: no copy may replace the live handle a reindex watches
        # A reindex's new model, and its vectors of the photos written meanwhile (`versions.Beside`).
        self.building: tuple[ModelHandle, Ahead] | None = None
        self.copies = Counter(
            "visrec_optimized_copies",
            "optimized copies of the live version, by outcome (made; dropped: the live version changed or a "
            "reindex watches it; failed: tried again later)",
            ["outcome"],
            registry=registry,
        )

    def run(self, job: WriteJob | SnapshotJob | RestoreJob, progress: Progress) -> dict[str, Any]:
        if isinstance(job, SnapshotJob):  # holds writes for its copy alone, never a job's turn
            return self.snapshot(job, progress)
        with self.jobs:
            log.info("running a handed-over %s", job.command)
            try:
                match job:
                    case SyncJob():
                        return self._sync(job, progress)
                    case ReindexJob():
                        return self._reindex(job, progress)
                    case RollbackJob():
                        with self.lock:
                            return self._rollback(job)
                    case RestoreJob():
                        return self._restore(job, progress)
            finally:
                self.service.refresh()

    @contextmanager
    def writing(self) -> Iterator[VectorIndex]:
        """One unit of writes: the writer held, on the live version of this moment (an optimized copy
        may have replaced the one a job started on)."""
        with self.lock, self.service.reading() as live:
            yield live.index

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
            result = run_sync(
                job, settings, self.writing, progress, model=self._model(job.model), optimize=False
            )
        except CollectionMissing:  # no collection yet: the first sync creates it, then the service opens it
            with self.lock, self.first_version() as index:
                return run_sync(
                    job, settings, index, progress, model=self._model(job.model), optimize_apart=True
                )
        self.changed(sum(result[k] for k in ("added", "updated", "metadata_updated", "deleted")))
        return result

    @contextmanager
    def first_version(self) -> Iterator[VectorIndex]:
        """The live version's place, held (no request reads it yet: it holds no collection), for the
        write that creates it; the service serves it from the next request on."""
        try:
            with self.version(self.service.store().live()) as index:
                yield index
        finally:
            self.service.refresh()

    @contextmanager
    def version(self, collection: str) -> Iterator[VectorIndex]:
        """The service's handle on a version, held: the one it serves once it is switched to."""
        store = self.service.store()
        index = self.service.state.hold(store.place(collection), lambda: store.open(collection))
        try:
            yield index
        finally:
            self.service.state.release(index)

    def changed(self, points: int) -> None:
        """Count points written into the live version; once there are `qdrant.optimize_after`, start
        replacing it by an optimized copy in the background. Never waits for it, never raises."""
        with self.lock:
            self.changed_since_optimize += points
            due = self.changed_since_optimize >= self.service.settings.qdrant.optimize_after
            busy = self._copying is not None or self._reindexing or self._closed
            if not due or busy or time.monotonic() < self._retry_at:
                return
            self._copying = threading.Thread(target=self._optimized_copy, name="optimized-copy", daemon=True)
            self._copying.start()

    def _optimized_copy(self) -> None:
        try:
            self._replace_by_optimized_copy()
        except _Dropped as exc:  # nothing went wrong: the next write past `optimize_after` starts another
            log.info("optimized copy dropped: %s", exc)
            self.copies.labels("dropped").inc()
        except Exception as exc:  # a bug too: the writes it followed are in the live version all the same
            with self.lock:
                self._retry_at = time.monotonic() + self._backoff
                log.error("optimized copy failed (%s); trying again in %.0f s", exc, self._backoff)
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            self.copies.labels("failed").inc()
        else:
            with self.lock:
                self._backoff = FIRST_BACKOFF_S
        finally:
            with self.lock:
                self._copying = None

    def _replace_by_optimized_copy(self) -> None:
        started = time.perf_counter()
        with self.service.reading() as live:
            copy = live.index.copy()  # most of it, beside writes: with them held, what changed since
            if copy is None:  # a server optimizes by itself
                with self.lock:
                    self.changed_since_optimize = 0
                return
            with self.lock:  # writes wait for the last flush and the copy's settling alone
                if self.service.state.live is not live:  # a job switched versions meanwhile: next write
                    copy.discard()
                    return
                copy.settle()
                changes = live.index.watch()
                counted, self.changed_since_optimize = self.changed_since_optimize, 0
            current = False
            try:
                copy.optimize()  # in a child process: reads and writes go on meanwhile
                index = copy.open()
                self.service.state.adopt(index)
                published = False
                try:
                    with caught_up(changes, copy_points(live.index, index), lambda: self.lock) as applied:
                        if self.service.state.live is not live or self._reindexing:
                            raise _Dropped("the live version changed, or a reindex watches it")
                        copy.make_current()
                        current = True
                        published = self.service.replace(live, index)
                finally:
                    if not published:
                        self.service.state.release(index)
            except BaseException:
                if not current:
                    copy.discard()
                with self.lock:
                    self.changed_since_optimize += counted
                raise
            finally:
                changes.close()
        self.copies.labels("made").inc()
        log.info(
            "%s replaced by an optimized copy after %d changed points (%.1f s; %d written meanwhile)",
            live.collection,
            counted,
            time.perf_counter() - started,
            applied,
        )

    def close(self) -> None:
        """Start no copy from now on (the service stops); one under way is left to the start-up sweep."""
        with self.lock:
            self._closed = True

    def _rollback(self, job: RollbackJob) -> dict[str, Any]:
        """Roll back and serve the restored version before writes go on (the caller holds them): a write
        let through first would go to the version rolled back from. Undone if it cannot be served."""
        with self.service.state.holding() as held:
            result = run_rollback(self.service.settings, force=job.force, held=held)
        try:
            self.service.serve_switched()
        except BaseException:
            self.service.store().switch(result["previous"])
            raise
        return result

    @contextmanager
    def _building(self) -> Iterator[tuple[Live | None, dict[str, VectorIndex]]]:
        """A new version built beside the live one (a reindex, a restore): yields the live pair (None
        when none is served) and the handles held for the build. No optimized copy replaces the live
        handle meanwhile: the build watches its writes. Without a live version served (the first, or
        one that cannot be opened) writes wait for the whole build: they would create or open the very
        version it builds."""
        with self.lock:
            self._reindexing = True
            live = self.service.state.live
        try:
            with ExitStack() as stack:
                if live is None:
                    stack.enter_context(self.lock)
                yield live, stack.enter_context(self.service.state.holding())
        finally:
            with self.lock:
                self._reindexing = False
                self.building = None

    def _reindex(self, job: ReindexJob, progress: Progress) -> dict[str, Any]:
        """Build the next version while writes go on into the live one; they are caught up with before
        the switch, which is served at once, with them held (`versions.Beside`)."""
        model = self._model(job.model)
        with self._building() as (live, held):
            beside = None
            if live:
                ahead = Ahead(model.manifest.model_version)
                beside = Beside(
                    live.index, lambda: self.lock, self.service.serve_switched, self.version, ahead
                )
                self.building = (model, ahead)
            return run_reindex(job, self.service.settings, progress, held=held, model=model, beside=beside)

    def snapshot(self, job: SnapshotJob, progress: Progress) -> dict[str, Any]:
        """`visrec snapshot` of the live version: copied beside writes, which are held only while the
        copy is settled (the last flush and what changed since, as for an optimized copy); a process of
        its own reads it into the archive (`snapshot.take_apart`: the GIL stays this one's, for requests
        and writes) while this thread waits, then the copy is removed, whatever became of that process.
        Its cut: every write acknowledged before the copy, none after. A copy left by a killed service
        is removed by the next start's sweep (the process ends with the service)."""
        store = self.service.store()
        started = time.perf_counter()
        with self.service.reading() as live:
            copy = live.index.copy()  # most of it, beside writes: with them held, what changed since
            if copy is None:  # a server: not handed over, so not reached; read the live one if it were
                with self.lock:
                    at, record = datetime.now(UTC), version_record(store, live.collection)
                return run_snapshot(
                    job, self.service.settings, live.index, record, Cut(at, CUT_COPY), progress
                )
            try:
                holding = time.perf_counter()
                with self.lock:
                    at = datetime.now(UTC)
                    copy.settle()
                    record = version_record(store, live.collection)
                cut = Cut(at, CUT_COPY, time.perf_counter() - holding)
                result = run_snapshot_apart(
                    job, self.service.settings, copy.folder, live.collection, record, cut, progress
                )
            finally:
                copy.discard()
        # The whole of it, as the command waited: the copy, its settling and the archive's process.
        return result | {"seconds": round(time.perf_counter() - started, 3)}

    def _restore(self, job: RestoreJob, progress: Progress) -> dict[str, Any]:
        """Build the snapshot's version beside the live one while writes go on into it; switch, and
        serve, with them held (`snapshot.Serving`)."""
        with self._building() as (live, held):
            serving = Serving(
                live.index if live else None,
                lambda: self.lock,
                self.service.serve_switched,
                self.version,
                lambda place: place in self.service.state.places(),
            )
            return run_restore(job, self.service.settings, progress, held=held, serving=serving)
