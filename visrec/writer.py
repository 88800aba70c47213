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
from pathlib import Path
from typing import Any

from visrec.errors import CollectionMissing
from visrec.jobs import Job, Progress, ReindexJob, RollbackJob, SyncJob, run_reindex, run_rollback, run_sync
from visrec.manifest import ModelHandle
from visrec.service import Service

log = logging.getLogger(__name__)


class Writer:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._lock = threading.Lock()  # one job at a time; the next command waits its turn
        self.changed_since_optimize = 0

    def run(self, job: Job, progress: Progress) -> dict[str, Any]:
        with self._lock:
            log.info("running a handed-over %s", job.command)
            try:
                match job:
                    case SyncJob():
                        return self._sync(job, progress)
                    case ReindexJob():
                        return self._reindex(job, progress)
                    case RollbackJob():
                        return run_rollback(self.service.settings)
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
            with store.open(store.live()) as index:
                return run_sync(job, settings, index, progress, model=self._model(job.model))
        self.changed_since_optimize += result["added"] + result["updated"] + result["deleted"]
        if self.changed_since_optimize >= settings.qdrant.optimize_after:
            log.warning(
                "optimizing %s after %d changed points: requests wait meanwhile",
                index.collection,
                self.changed_since_optimize,
            )
            index.optimize()
            self.changed_since_optimize = 0
        return result

    def _reindex(self, job: ReindexJob, progress: Progress) -> dict[str, Any]:
        try:
            live = self.service.live()
            held = {live.collection: live.index}
        except CollectionMissing:
            held = {}
        return run_reindex(job, self.service.settings, progress, held=held, model=self._model(job.model))
