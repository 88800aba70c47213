"""The `visrec` command line: parses arguments, calls a stage, formats the result.

Settings come from the environment (VISREC_*) and `.env`; flags override them. A user mistake ends
with one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.logging import RichHandler
from rich.markup import escape

from visrec.catalogue import read_catalogue
from visrec.cli_output import (
    duplicates_table,
    emit,
    err,
    hits_table,
    key_value_table,
    progress_bars,
    reindex_table,
    report_table,
    status_table,
    sync_table,
    trained_table,
)
from visrec.config import Settings, load_settings
from visrec.errors import InvalidQuery, InvalidSetting, VisrecError
from visrec.jobs import Job, ReindexJob, RollbackJob, SyncJob
from visrec.plan import Shard

if TYPE_CHECKING:  # torch: imported by the commands that embed, not by every command
    import torch

    from visrec.embed import Embedder
    from visrec.estimate import Estimate

app = typer.Typer(
    help="Visually similar products, filtered by metadata.",
    epilog="Docs: README.md, then docs/cli.md, http-api.md, catalogue.md, configuration.md, operations.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
# How `similar` and `neighbours` choose results: the same options, said once (`jobs._Choosing` parses them).
CategoryOption = Annotated[list[str] | None, typer.Option(help="Any of these categories (repeat).")]
ColourOption = Annotated[list[str] | None, typer.Option(help="Any of these colours (repeat).")]
PriceMinOption = Annotated[float | None, typer.Option(help="Lowest price.")]
PriceMaxOption = Annotated[float | None, typer.Option(help="Highest price.")]
WhereOption = Annotated[
    list[str] | None,
    typer.Option(
        help="FIELD=VALUE (repeat): that text, or for true, false or a number also that boolean or "
        "number; FIELD=LOW..HIGH: a range of numbers (docs/filters.md)."
    ),
]
ColourWeightOption = Annotated[
    float, typer.Option(help="0-1: prefer the colour of the product (or photo) asked about.")
]
DiversityOption = Annotated[
    float, typer.Option(help="0-1: prefer products unlike those already chosen (MMR).")
]
MaxPerOption = Annotated[
    list[str] | None, typer.Option(help="FIELD=N: at most N results per value of FIELD (repeat).")
]
ExcludeOption = Annotated[
    list[str] | None, typer.Option("--exclude", help="ID: never return this product (repeat).")
]
BoostOption = Annotated[
    list[str] | None,
    typer.Option(
        help="FIELD=WEIGHT: prefer products by a numeric or boolean field (in_stock=1: an in-stock "
        "product ranks as if half as far; repeat; docs/queries.md)."
    ),
]
DecayOption = Annotated[
    list[str] | None,
    typer.Option(
        help="FIELD=SCALE: newer first by an ISO 8601 date field; SCALE older (e.g. 30d) ranks "
        "as if twice as far."
    ),
]


def _choosing(
    category: list[str] | None,
    colour: list[str] | None,
    price_min: float | None,
    price_max: float | None,
    where: list[str] | None,
    colour_weight: float,
    diversity: float,
    max_per: list[str] | None,
    exclude: list[str] | None,
    boost: list[str] | None,
    decay: list[str] | None,
) -> dict[str, Any]:
    """The choosing options as a job's fields (`jobs._Choosing`)."""
    return {
        "category": category or [],
        "colour": colour or [],
        "price_min": price_min,
        "price_max": price_max,
        "where": where or [],
        "colour_weight": colour_weight,
        "diversity": diversity,
        "max_per": max_per or [],
        "exclude": exclude or [],
        "boost": boost or [],
        "decay": decay or [],
    }


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a `VisrecError` into one line on stderr and its exit code; anything else (a bug) too, exit 1,
    with its traceback logged under -v."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            known = isinstance(exc, VisrecError)
            if not known:
                log.info("unexpected error", exc_info=True)
            message = str(exc) if known else f"unexpected {type(exc).__name__}: {exc} (-v shows where)"
            # (escaped: a message's own brackets, `visrec[parquet]` or a filter's `[a, b]`, are text)
            err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code if isinstance(exc, VisrecError) else 1) from None

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )


def _settings(flags: dict[str, str] | None = None, /, **overrides: Any) -> Settings:
    """Settings from the environment and .env, with the flags that were given (not None) on top.

    Flags are named by dotted path ("train.image_size"); pydantic-settings merges them over the
    environment group by group and validates the result. A bad value is named by its flag: the
    setting's last part with dashes (`--image-size`), `--model` for the artefact, or as `flags` says.
    """
    nested: dict[str, Any] = {}
    names: dict[str, str] = {}
    for dotted, value in overrides.items():
        if value is not None:
            group, _, name = dotted.rpartition(".")
            (nested.setdefault(group, {}) if group else nested)[name] = value
            default = "--model" if dotted == "artefact" else "--" + name.replace("_", "-")
            names[dotted] = (flags or {}).get(dotted, default)
    try:
        return load_settings(names, **nested)
    except ValueError as exc:
        raise InvalidSetting(f"invalid setting: {exc}") from None


def _device(settings: Settings) -> torch.device:
    from visrec.embed import resolve_device

    return resolve_device(settings.embed.device)


def _embedder(settings: Settings, artefact: Path | None = None) -> Embedder:
    from visrec.embed import Embedder

    return Embedder(artefact or settings.artefact, _device(settings), settings.embed)


def _run(job: Job, settings: Settings, show_progress: bool) -> dict[str, Any]:
    """Run a command that uses the store: handed to the service that owns the embedded store when one
    runs (`visrec.owner`: a writing command through its writer, a reading one beside it), else here.
    Either way the same stages, progress, result and exit codes."""
    from visrec.handover import find_owner, hand_over
    from visrec.jobs import READS, run_here
    from visrec.reads import read_here

    owner = find_owner(settings.qdrant)
    with progress_bars(show_progress) as progress:
        if owner is not None:
            log.info("the store is owned by a running service: handing the %s over to it", job.command)
            return hand_over(owner, job, progress, settings.qdrant)
        if isinstance(job, READS):
            return read_here(job, settings, progress)
        return run_here(job, settings, progress)


@app.command()
@user_errors
def train(
    catalogue: Annotated[
        Path, typer.Argument(help="Catalogue file (.csv or .jsonl) with a category column.")
    ],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Artefact folder [VISREC_ARTEFACT].")] = None,
    backbone: Annotated[str | None, typer.Option(help="resnet50 (default) or resnet18.")] = None,
    weights: Annotated[str | None, typer.Option(help="packaged | imagenet | random | PATH.pth")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels.")] = None,
    epochs_frozen: Annotated[int | None, typer.Option(help="Phase 1 epochs (backbone frozen).")] = None,
    epochs_finetune: Annotated[int | None, typer.Option(help="Phase 2 epochs (all layers).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="softmax (the paper's, default) or normalized-softmax (cosine classifier)."),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="normalized-softmax only: logits = cos / temperature (0.05).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fine-tune the embedder on a catalogue (the paper's two phases) and export it."""
    from visrec.train import export  # training stays out of serving's imports
    from visrec.train import train as fit

    settings = _settings(
        {"artefact": "--out"},
        artefact=out_dir,
        **{
            "train.backbone": backbone,
            "train.weights": weights,
            "train.image_size": image_size,
            "train.epochs_frozen": epochs_frozen,
            "train.epochs_finetune": epochs_finetune,
            "train.batch_size": batch_size,
            "train.loss": loss,
            "train.temperature": temperature,
        },
    )
    device = _device(settings)
    products = read_catalogue(catalogue, settings.ingest)

    def announce(guess: Estimate) -> None:  # on stderr, with --json too: stdout stays the JSON
        err.print(guess.message(), highlight=False, markup=False, soft_wrap=True)

    with progress_bars(not as_json) as progress:
        result = fit(products, settings, device, progress, announce=announce)
    manifest = export(result, settings)
    data = {"artefact": str(settings.artefact), **manifest.model_dump(mode="json")}
    emit(as_json, data, trained_table(manifest, settings.artefact))


@app.command()
@user_errors
def sync(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue file (.csv or .jsonl).")],
    model: Annotated[Path | None, typer.Option(help="Artefact folder [VISREC_ARTEFACT].")] = None,
    shard: Annotated[
        str, typer.Option(help="i/N: sync only shard i of N (one of N parallel workers).")
    ] = "0/1",
    max_delete: Annotated[
        float | None,
        typer.Option(help="Refuse to delete more than this share of the indexed products [0.2; 1: any]."),
    ] = None,
    checksum: Annotated[
        bool,
        typer.Option(help="Hash every local photo, not only those whose size or modification time changed."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Embed new products and changed photos, update changed metadata in place, delete removed products,
    skip the rest. With `visrec serve` running on the embedded store, the service does it."""
    Shard.parse(shard)  # a bad --shard is said before anything runs
    settings = _settings(artefact=model, **{"ingest.max_delete": max_delete})
    job = SyncJob(
        catalogue=catalogue.absolute(),
        model=settings.artefact.absolute(),
        shard=shard,
        max_delete=settings.ingest.max_delete,
        checksum=checksum,
    )
    data = _run(job, settings, not as_json)
    emit(as_json, data, sync_table("sync", data))


@app.command()
@user_errors
def reindex(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue file (.csv or .jsonl).")],
    model: Annotated[Path, typer.Option(help="The new model's artefact folder.")],
    accept_failures: Annotated[
        bool, typer.Option(help="Go live even if some images failed (listed in the failure report).")
    ] = False,
    max_quality_drop: Annotated[
        float | None,
        typer.Option(
            help="Refuse (exit 3) if the new version's same-category P@10 or mAP@10 is more than this "
            "below the live one's [0.01]."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Go live whatever the quality gate measures (the figures are still shown).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build the next version of the collection with a new model, measure it against the live one
    (same-category P@10 and mAP@10 on the same products), then make it live in one atomic switch unless
    it is worse; the previous version stays for `visrec rollback`. With `visrec serve` running on the
    embedded store, the service does it."""
    settings = _settings(artefact=model, **{"gate.max_quality_drop": max_quality_drop})
    job = ReindexJob(
        catalogue=catalogue.absolute(),
        model=settings.artefact.absolute(),
        max_quality_drop=settings.gate.max_quality_drop,
        force=force,
        accept_failures=accept_failures,
    )
    data = _run(job, settings, not as_json)
    emit(as_json, data, reindex_table(data))


@app.command()
@user_errors
def rollback(
    force: Annotated[
        bool,
        typer.Option(
            help="Roll back even if products written since the switch would be lost from the "
            "restored version."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make the previous version of the collection live again (after a `reindex`)."""
    data = _run(RollbackJob(force=force), _settings(), False)
    emit(as_json, data, key_value_table("rollback", data))


@app.command()
@user_errors
def similar(
    product_id: Annotated[str | None, typer.Argument(help="Find products like this one.")] = None,
    image: Annotated[Path | None, typer.Option(help="…or like this photo.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many.")] = 10,
    category: CategoryOption = None,
    colour: ColourOption = None,
    price_min: PriceMinOption = None,
    price_max: PriceMaxOption = None,
    where: WhereOption = None,
    colour_weight: ColourWeightOption = 0.0,
    diversity: DiversityOption = 0.0,
    max_per: MaxPerOption = None,
    exclude: ExcludeOption = None,
    boost: BoostOption = None,
    decay: DecayOption = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="For --image: the index's model, where the artefact it recorded cannot be read here "
            "[VISREC_ARTEFACT]."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Products most similar to a product id (any of its photos) or a photo, under metadata filters;
    one result per product, with the photo that matched. A photo is embedded by the model that built
    the index (the artefact it recorded, else --model if that is the same model)."""
    from visrec.images import ImageLimits, read_local_image
    from visrec.jobs import SimilarJob

    if (product_id is None) == (image is None):
        raise InvalidQuery("give either a PRODUCT_ID or --image PATH")
    settings = _settings(artefact=model)
    if model is not None:
        from visrec.manifest import read_manifest

        read_manifest(model)  # a --model given must be a model (ModelError, exit 3), used or not
    chosen = SimilarJob(
        product_id=product_id,
        k=k,
        **_choosing(
            category,
            colour,
            price_min,
            price_max,
            where,
            colour_weight,
            diversity,
            max_per,
            exclude,
            boost,
            decay,
        ),
    )
    chosen.filters(), chosen.rules()  # checked here: a mistake is said before the store is asked
    # Read here under the query photo's limits: a service beside takes no bigger one (ImageError, exit 2).
    limits = ImageLimits(settings.ingest.max_image_pixels, settings.ingest.max_image_bytes)  # links allowed
    photo = None if image is None else read_local_image(str(image), limits)
    job = chosen.model_copy(update={"image": photo})
    data = _run(job, settings, False)
    if data["note"]:
        err.print(f"[yellow]note:[/yellow] nothing found: {data['note']}", highlight=False, soft_wrap=True)
    emit(as_json, data["hits"], hits_table(data["hits"]))


@app.command()
@user_errors
def status(as_json: JsonFlag = False) -> None:
    """What is indexed, where, and which model made it."""
    from visrec.jobs import StatusJob
    from visrec.manifest import read_manifest

    settings = _settings()
    indexed = _run(StatusJob(), settings, False)
    try:
        manifest = read_manifest(settings.artefact)
        model_info: dict[str, Any] = {"model_version": manifest.model_version, "metrics": manifest.metrics}
    except VisrecError as exc:
        model_info = {"model_version": None, "problem": str(exc)}
    where = settings.qdrant.url or str(settings.qdrant.path)
    data = {
        "store": where,
        "collection": settings.qdrant.collection,
        **indexed,
        "artefact": str(settings.artefact),
        **model_info,
    }
    emit(as_json, data, status_table(data))


@app.command()
@user_errors
def report(
    out_file: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
    queries: Annotated[int, typer.Option(help="Query products, spread over categories.")] = 6,
    k: Annotated[int, typer.Option("-k", help="Neighbours per query.")] = 8,
    same_category: Annotated[bool, typer.Option(help="Filter neighbours to the query's category.")] = False,
    seed: Annotated[int, typer.Option(help="Which products are picked.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Write an HTML page of query products and their nearest neighbours (the paper's Fig. 2)."""
    from visrec.jobs import ReportJob

    job = ReportJob(out=out_file.absolute(), queries=queries, k=k, same_category=same_category, seed=seed)
    data = _run(job, _settings(), False)
    emit(as_json, data, report_table(data))


@app.command()
@user_errors
def duplicates(
    max_distance: Annotated[
        float | None,
        typer.Option(
            help="Photos this close (Euclidean) count as one [VISREC_DUPLICATES__MAX_DISTANCE; default: "
            "VISREC_DUPLICATES__MAX_RELATIVE x the median vector length]."
        ),
    ] = None,
    neighbours: Annotated[
        int | None, typer.Option(help="Nearest products searched per photo [VISREC_DUPLICATES__NEIGHBOURS].")
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Also write an HTML page of the groups.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Groups of distinct products whose photos are near-identical (a photo re-used, re-encoded, resized)."""
    from visrec.duplicates import check_options
    from visrec.jobs import DuplicatesJob

    settings = _settings()
    check_options(  # before the store is asked
        (settings.duplicates.max_distance if max_distance is None else max_distance) or 0.0,
        settings.duplicates.neighbours if neighbours is None else neighbours,
        settings.duplicates.max_colour_delta_e,
    )
    job = DuplicatesJob(
        max_distance=max_distance,
        neighbours=neighbours,
        out=None if out_file is None else out_file.absolute(),
    )
    data = _run(job, settings, not as_json)
    emit(as_json, data, duplicates_table(data))


@app.command()
@user_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Interface [VISREC_API__HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [VISREC_API__PORT].")] = None,
    insecure: Annotated[
        bool, typer.Option(help="Listen beyond loopback without an API key [VISREC_API__INSECURE].")
    ] = False,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    from visrec.api import run

    settings = _settings(**{"api.host": host, "api.port": port, "api.insecure": insecure or None})
    run(settings, _device(settings), lambda lines: err.print(lines, highlight=False, soft_wrap=True))


@app.command()
@user_errors
def neighbours(
    out_file: Annotated[
        Path,
        typer.Option("--out", help="Feed file to write (replaced whole; a stopped run leaves the last)."),
    ],
    since: Annotated[
        Path | None,
        typer.Option(help="A previous feed: write only what changed since it (a delta; docs/neighbours.md)."),
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="jsonl, csv or parquet [the --out suffix; else jsonl].")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per product.")] = 20,
    same: Annotated[
        list[str] | None,
        typer.Option(help="FIELD: a neighbour holds the product's own value of it (repeat)."),
    ] = None,
    category: CategoryOption = None,
    colour: ColourOption = None,
    price_min: PriceMinOption = None,
    price_max: PriceMaxOption = None,
    where: WhereOption = None,
    colour_weight: ColourWeightOption = 0.0,
    diversity: DiversityOption = 0.0,
    max_per: MaxPerOption = None,
    exclude: ExcludeOption = None,
    boost: BoostOption = None,
    decay: DecayOption = None,
    exact: Annotated[
        bool, typer.Option(help="Search every point (no HNSW graph): exact lists, slowly; for checks.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Every product's nearest products, as `visrec similar ID` chooses them (filters choose the products
    listed and their neighbours), written to a file: JSON lines, CSV or Parquet. With --since, only
    the lists that changed since a previous feed, and the products gone from it."""
    from visrec.cli_output import neighbours_table
    from visrec.feed import check_writable, format_of
    from visrec.jobs import NeighboursJob
    from visrec.reads import feed_rules

    out = out_file.absolute()
    job = NeighboursJob(
        out=out,
        format=format_of(out, output_format),
        since=None if since is None else since.absolute(),
        k=k,
        **_choosing(
            category,
            colour,
            price_min,
            price_max,
            where,
            colour_weight,
            diversity,
            max_per,
            exclude,
            boost,
            decay,
        ),
        same=same or [],
        exact=exact,
    )
    feed_rules(job)  # checked here: a mistake is said before the store is asked
    check_writable(out)
    data = _run(job, _settings(), not as_json)
    emit(as_json, data, neighbours_table(data))


@app.command()
@user_errors
def snapshot(
    folder: Annotated[Path, typer.Argument(help="Folder to write the snapshot into (made if missing).")],
    keep: Annotated[
        int | None, typer.Option(help="Then keep only the newest N snapshots of this collection in FOLDER.")
    ] = None,
    with_model: Annotated[
        bool,
        typer.Option(help="Carry the model's artefact too: restorable where that model is not deployed."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write the live version into one self-contained archive (points, version record, the model that built
    it, the cut it holds), with a checksum file beside it. With `visrec serve` running on the embedded
    store, the service takes it: writes wait only while it copies the live version, reads never."""
    from visrec.jobs import SnapshotJob

    if keep is not None and keep < 1:
        raise InvalidSetting(f"--keep {keep}: keep at least 1 snapshot")
    job = SnapshotJob(out=folder.absolute(), keep=keep, with_model=with_model)
    data = _run(job, _settings(), not as_json)
    emit(as_json, data, key_value_table("snapshot", data))


@app.command()
@user_errors
def restore(
    snapshot: Annotated[Path, typer.Argument(help="A snapshot file (its .sha256 file beside it).")],
    force: Annotated[
        bool, typer.Option(help="Restore even if products written since the snapshot are dropped.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make a snapshot the live version: built beside the live one and switched to in one step
    (`visrec rollback` undoes it). Refuses a damaged snapshot, a model that is not here, and, unless
    --force, dropping products written since the snapshot. With `visrec serve` running, the service
    does it."""
    from visrec.jobs import RestoreJob

    data = _run(RestoreJob(snapshot=snapshot.absolute(), force=force), _settings(), not as_json)
    emit(as_json, data, key_value_table("restore", data))
