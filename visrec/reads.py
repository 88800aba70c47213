"""The reading commands (`status`, `similar`, `report`, `duplicates`, `neighbours`) as jobs: run on an
index this process opened, or in the service that owns the embedded store (handed over like the writing
commands, run on its live version beside writes, never by its writer). Either way the same stages and
the same result: the dict `--json` prints, from which the CLI also draws its tables (`visrec.cli_output`).
A report's or a duplicates page's HTML, and a neighbours feed, are written where the job runs, at the
absolute path the command gave (the service runs as the command's user: the owner channel checks); a
feed reads the one live version it started on from start to end (the service holds it for the job).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from visrec import query
from visrec.config import Settings
from visrec.images import ImageLimits
from visrec.index import VectorIndex, open_index, open_store
from visrec.jobs import DuplicatesJob, NeighboursJob, Progress, ReportJob, SimilarJob, StatusJob
from visrec.manifest import artefact_for
from visrec.neighbours import FeedRules
from visrec.payload import for_operators

if TYPE_CHECKING:  # torch loads only for a query photo
    from visrec.embed import Embedder

ReadJob = StatusJob | SimilarJob | ReportJob | DuplicatesJob | NeighboursJob


def read_here(job: ReadJob, settings: Settings, progress: Progress | None) -> dict[str, Any]:
    """Run `job` in this process, which opens the store itself (no service owns it)."""
    if isinstance(job, StatusJob):
        from visrec.versions import describe

        with open_store(settings.qdrant) as store:
            return describe(store)
    with open_index(settings.qdrant) as index:
        return run_read(job, index, settings, lambda: _model_of(index, settings), progress)


def run_read(
    job: SimilarJob | ReportJob | DuplicatesJob | NeighboursJob,
    index: VectorIndex,
    settings: Settings,
    model: Callable[[], Embedder],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The job's result on `index` (a live version); `model` gives the model that built it, for a query
    photo (called only then)."""
    match job:
        case SimilarJob():
            return _similar(job, index, settings, model)
        case ReportJob():
            return _report(job, index)
        case DuplicatesJob():
            return _duplicates(job, index, settings, progress)
        case NeighboursJob():
            return _neighbours(job, index, progress)


def _model_of(index: VectorIndex, settings: Settings) -> Embedder:
    """The model that built `index` (its recorded artefact, else the configured one if it is the same)."""
    from visrec.embed import Embedder, resolve_device

    artefact = artefact_for(index.metadata(), settings.artefact)
    return Embedder(artefact, resolve_device(settings.embed.device), settings.embed)


def _similar(
    job: SimilarJob, index: VectorIndex, settings: Settings, model: Callable[[], Embedder]
) -> dict[str, Any]:
    filters, rules = job.filters(), job.rules()
    k = job.k
    if job.image is not None:
        limits = ImageLimits.from_settings(settings.ingest)
        hits = query.similar_to_image(index, model(), job.image, limits, k, filters, job.colour_weight, rules)
    else:
        hits = query.similar_to_product(index, str(job.product_id), k, filters, job.colour_weight, rules)
    exclude = [] if job.product_id is None else [job.product_id]
    note = None if hits else query.why_empty(index, filters, exclude)
    return {"hits": [h.to_dict(for_operators) for h in hits], "note": note}


def _report(job: ReportJob, index: VectorIndex) -> dict[str, Any]:
    from visrec.report import check_writable, pick_queries, run_queries, write_html

    check_writable(job.out)
    rows = run_queries(index, pick_queries(index, job.queries, job.seed), job.k, job.same_category)
    version = str(rows[0].query.get("model_version", "")) if rows else ""
    path = write_html(rows, job.out, "visrec: products and their nearest neighbours", version)
    return {
        "report": str(path.resolve()),
        "rows": [
            {
                "query": r.query_id,
                "category": r.query.get("category"),
                "filter": r.filters.category,
                "hits": [h.to_dict(for_operators) for h in r.hits],
            }
            for r in rows
        ],
    }


def _duplicates(
    job: DuplicatesJob, index: VectorIndex, settings: Settings, progress: Progress | None
) -> dict[str, Any]:
    from visrec.duplicates import check_options, scan_with
    from visrec.report import check_writable, write_duplicates_html

    if job.out is not None:
        check_writable(job.out, page="duplicates.html")
    defaults = settings.duplicates
    chosen = defaults.model_copy(
        update={
            "max_distance": defaults.max_distance if job.max_distance is None else job.max_distance,
            "neighbours": defaults.neighbours if job.neighbours is None else job.neighbours,
        }
    )
    check_options(chosen.max_distance or 0.0, chosen.neighbours, chosen.max_colour_delta_e)

    def scanned(done: int, total: int) -> None:
        if progress is not None:
            progress("scan", done, total)

    scan, scale = scan_with(index, chosen, scanned)
    data: dict[str, Any] = {**scan.to_dict(for_operators), **scale}
    if job.out is not None:
        model_version = index.metadata().get("model_version", "")
        data["report"] = str(write_duplicates_html(scan, job.out, model_version).resolve())
    return data


def feed_rules(job: NeighboursJob) -> FeedRules:
    """The job's options as the stage takes them; raises `InvalidQuery`/`InvalidFilter` with the reason."""
    chosen = FeedRules(
        job.k, job.filters(), job.rules(), job.colour_weight, tuple(dict.fromkeys(job.same)), job.exact
    )
    chosen.check()
    return chosen


def _neighbours(job: NeighboursJob, index: VectorIndex, progress: Progress | None) -> dict[str, Any]:
    from visrec.feed import check_writable, format_of
    from visrec.feed_run import make_feed

    rules = feed_rules(job)
    fmt = format_of(job.out, job.format)  # pyarrow where the job runs, for Parquet
    check_writable(job.out)
    return make_feed(index, rules, job.out, fmt, job.since, progress)
