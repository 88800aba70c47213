"""The commands that use the store as jobs: what the CLI asked, as data that runs in this process or
travels to the service that owns the store (`visrec.owner`), and runs there through the same stages. The
writing commands (`sync`, `reindex`, `rollback`) run here or in the service's writer (`ingest.sync`,
`versions.reindex`, `versions.rollback`); the reading ones (`status`, `similar`, `report`, `duplicates`,
`neighbours`) in `visrec.reads`, beside any writes. A job's result is the dict the CLI prints (`--json`),
wherever it ran.

A job carries the command's flags, already checked by the CLI; the process that runs it adds its own
settings (a handed-over job runs with the service's `VISREC_INGEST__*`, image roots included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visrec.archive import Archive, now
from visrec.catalogue import read_catalogue
from visrec.config import Settings
from visrec.errors import CollectionMissing
from visrec.filters import Filters
from visrec.handle import ModelHandle
from visrec.index import VectorIndex, engine_version, open_index, open_store
from visrec.ingest import SyncOptions, Writing, sync
from visrec.plan import Shard
from visrec.rules import Rules
from visrec.snapshot import (
    CUT_ALONE,
    CUT_SCROLL,
    Cut,
    Serving,
    restore,
    take,
    take_apart,
    version_record,
)
from visrec.versions import Beside, reindex, rollback

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyncJob(_Job):
    command: Literal["sync"] = "sync"
    catalogue: Path  # absolute
    model: Path  # the artefact, absolute
    shard: str = "0/1"
    max_delete: float = Field(ge=0, le=1)
    checksum: bool = False


class ReindexJob(_Job):
    command: Literal["reindex"] = "reindex"
    catalogue: Path
    model: Path
    max_quality_drop: float = Field(ge=0, le=1)
    force: bool = False
    accept_failures: bool = False


class RollbackJob(_Job):
    command: Literal["rollback"] = "rollback"
    force: bool = False


class StatusJob(_Job):
    """`visrec status`'s look at the store (the versions, their points and quality)."""

    command: Literal["status"] = "status"


class _Choosing(_Job):
    """How `similar` and `neighbours` choose results: the filters and the rules, as the CLI's options
    were given (checked there, parsed again where the job runs)."""

    category: list[str] = []
    colour: list[str] = []
    price_min: float | None = None
    price_max: float | None = None
    where: list[str] = []
    colour_weight: float = 0.0
    diversity: float = 0.0
    max_per: list[str] = []
    exclude: list[str] = []
    boost: list[str] = []
    decay: list[str] = []

    def filters(self) -> Filters:
        """Raises `InvalidFilter` with the reason."""
        return Filters.parse(
            category=self.category,
            colour=self.colour,
            price_min=self.price_min,
            price_max=self.price_max,
            where=self.where,
        )

    def rules(self) -> Rules:
        """Raises `InvalidQuery` with the reason."""
        return Rules.parse(
            diversity=self.diversity,
            max_per=self.max_per,
            exclude=self.exclude,
            boost=self.boost,
            decay=self.decay,
        )


class SimilarJob(_Choosing):
    """`visrec similar`."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    command: Literal["similar"] = "similar"
    product_id: str | None = None
    image: bytes | None = None  # the photo's bytes (base64 on the wire): read by the command's user
    k: int = 10


class ReportJob(_Job):
    command: Literal["report"] = "report"
    out: Path  # absolute
    queries: int = 6
    k: int = 8
    same_category: bool = False
    seed: int = 0


class DuplicatesJob(_Job):
    command: Literal["duplicates"] = "duplicates"
    max_distance: float | None = None
    neighbours: int | None = None
    out: Path | None = None  # absolute


class NeighboursJob(_Choosing):
    """`visrec neighbours`: every product's list, written to `out` (a delta on `since`'s state)."""

    command: Literal["neighbours"] = "neighbours"
    out: Path  # absolute
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    since: Path | None = None  # absolute
    k: int = 20
    same: list[str] = []
    exact: bool = False


class SnapshotJob(_Job):
    """`visrec snapshot`: the live version into an archive in `out` (`visrec.snapshot.take`)."""

    command: Literal["snapshot"] = "snapshot"
    out: Path  # the folder, absolute
    keep: int | None = Field(default=None, ge=1)
    with_model: bool = False


class RestoreJob(_Job):
    """`visrec restore`: the archive at `snapshot` made the live version (`visrec.snapshot.restore`)."""

    command: Literal["restore"] = "restore"
    snapshot: Path  # absolute
    force: bool = False


WriteJob = SyncJob | ReindexJob | RollbackJob  # the writer runs these, one at a time
# These read the live version, beside writes.
READS = (StatusJob, SimilarJob, ReportJob, DuplicatesJob, NeighboursJob)
Job = Annotated[
    SyncJob
    | ReindexJob
    | RollbackJob
    | StatusJob
    | SimilarJob
    | ReportJob
    | DuplicatesJob
    | NeighboursJob
    | SnapshotJob
    | RestoreJob,
    Field(discriminator="command"),
]


# The owner channel's version: raise it when a request or an answer changes meaning (3: neighbours,
# snapshot and restore jobs; 4: exclude, boost and decay, and every hit's score).
PROTOCOL = 4


class StoreId(BaseModel):
    """The embedded store a job is for, as the command sees it: the folder's resolved path, its device
    and inode (a copy of the folder has another pair, whatever its path), and the collection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    device: int
    inode: int
    collection: str


class JobRequest(BaseModel):
    """What travels over the owner channel: the job, and which store it is for. The service runs it only
    on the store it owns (a marker copied with its store folder must not send the copy's jobs here)."""

    model_config = ConfigDict(extra="forbid")

    protocol: int
    store: StoreId
    job: Job


def _with_flags(settings: Settings, job: SyncJob | ReindexJob) -> Settings:
    ingest = settings.ingest
    if isinstance(job, SyncJob):
        ingest = ingest.model_copy(update={"max_delete": job.max_delete})
    gate = settings.gate
    if isinstance(job, ReindexJob):
        gate = gate.model_copy(update={"max_quality_drop": job.max_quality_drop})
    return settings.model_copy(update={"artefact": job.model, "ingest": ingest, "gate": gate})


def run_sync(
    job: SyncJob,
    settings: Settings,
    index: VectorIndex | Writing,
    progress: Progress | None = None,
    *,
    model: ModelHandle | None = None,
    optimize: bool = True,
    optimize_apart: bool = False,
) -> dict[str, Any]:
    """`visrec sync` on `index`; `model`: the handle to embed with (the service's, already loaded);
    `optimize`, `optimize_apart`: as `SyncOptions` says."""
    settings = _with_flags(settings, job)
    catalogue = read_catalogue(job.catalogue, settings.ingest)
    options = SyncOptions.from_settings(settings, Shard.parse(job.shard), checksum=job.checksum)
    options = replace(options, optimize=optimize, optimize_apart=optimize_apart)
    handle = model or ModelHandle(settings.artefact, settings.embed)
    summary = sync(
        catalogue, index, handle, options, progress=lambda done, total: _tell(progress, "embed", done, total)
    )
    return summary.to_dict()


def run_reindex(
    job: ReindexJob,
    settings: Settings,
    progress: Progress | None = None,
    *,
    held: Mapping[str, VectorIndex] | None = None,
    model: ModelHandle | None = None,
    beside: Beside | None = None,
) -> dict[str, Any]:
    """`visrec reindex`; `held`: versions this process has open (the service's live one), whose requests
    must not stop: the new version is then optimized in a process of its own; `beside`: the service
    writing into the live version meanwhile."""
    settings = _with_flags(settings, job)
    catalogue = read_catalogue(job.catalogue, settings.ingest)
    with open_store(settings.qdrant) as store:
        summary = reindex(
            catalogue,
            store,
            model or ModelHandle(settings.artefact, settings.embed),
            replace(SyncOptions.from_settings(settings), optimize_apart=held is not None),
            gate=settings.gate,
            force=job.force,
            accept_failures=job.accept_failures,
            progress=lambda done, total: _tell(progress, "embed", done, total),
            held=held,
            beside=beside,
        )
    return summary.to_dict()


def run_rollback(
    settings: Settings, *, force: bool = False, held: Mapping[str, VectorIndex] | None = None
) -> dict[str, Any]:
    """`visrec rollback`; `held`: versions this process has open (the service's live one)."""
    with open_store(settings.qdrant) as store:
        done = rollback(store, force=force, held=held)
    return {"previous": done.previous, "live": done.live, "dropped": done.dropped}


def run_here(
    job: WriteJob | SnapshotJob | RestoreJob, settings: Settings, progress: Progress | None
) -> dict[str, Any]:
    """Run `job` in this process, which opens the store itself (no service owns it)."""
    match job:
        case SyncJob():
            with open_index(settings.qdrant) as index:
                return run_sync(job, settings, index, progress)
        case ReindexJob():
            return run_reindex(job, settings, progress)
        case RollbackJob():
            return run_rollback(settings, force=job.force)
        case SnapshotJob():
            return run_snapshot_here(job, settings, progress)
        case RestoreJob():
            return run_restore(job, settings, progress)


def _tell(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def run_snapshot(
    job: SnapshotJob,
    settings: Settings,
    index: VectorIndex,
    record: dict[str, Any],
    cut: Cut,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`visrec snapshot` of `index`, a version nobody writes to while it is read (or a server's: `cut`
    says); `record`: its alias and version (`snapshot.version_record`)."""
    return take(index, job.out, **_archive_options(job, settings, record, cut, progress))


def run_snapshot_apart(
    job: SnapshotJob,
    settings: Settings,
    folder: Path,
    collection: str,
    record: dict[str, Any],
    cut: Cut,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`run_snapshot` of the embedded version `collection` held in `folder` (a settled copy nobody
    writes to), in a process of its own (`snapshot.take_apart`)."""
    options = _archive_options(job, settings, record, cut, progress)
    return take_apart(folder, collection, settings.qdrant, job.out, **options)


def _archive_options(
    job: SnapshotJob, settings: Settings, record: dict[str, Any], cut: Cut, progress: Progress | None
) -> dict[str, Any]:
    """What `snapshot.take` and `take_apart` are told besides where to read and write."""
    return {
        "record": record,
        "cut": cut,
        "engine": engine_version(settings.qdrant),
        "configured_model": settings.artefact,
        "with_model": job.with_model,
        "keep": job.keep,
        "progress": progress,
    }


def run_snapshot_here(job: SnapshotJob, settings: Settings, progress: Progress | None) -> dict[str, Any]:
    """`visrec snapshot` in this process, which opens the store itself: on the embedded store no other
    process can write meanwhile; on a server others may (`snapshot.CUT_SCROLL`)."""
    with open_store(settings.qdrant) as store:
        live = store.live()
        with store.open(live) as index:
            if not index.exists():
                raise CollectionMissing(f"nothing to snapshot: {live} does not exist yet (run `visrec sync`)")
            cut = Cut(now(), CUT_SCROLL if settings.qdrant.url else CUT_ALONE)
            return run_snapshot(job, settings, index, version_record(store, live), cut, progress)


def run_restore(
    job: RestoreJob,
    settings: Settings,
    progress: Progress | None = None,
    *,
    held: Mapping[str, VectorIndex] | None = None,
    serving: Serving | None = None,
) -> dict[str, Any]:
    """`visrec restore`; `held`: versions this process has open; `serving`: the service writing into the
    live version meanwhile."""
    archive = Archive.open(job.snapshot)
    with open_store(settings.qdrant) as store:
        return restore(
            archive,
            store,
            settings.artefact,
            force=job.force,
            progress=progress,
            held=held,
            serving=serving,
        )
