"""The commands that read the index: `similar`, `report`, `duplicates` and `neighbours`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from visrec.cli_common import (
    BoostOption,
    CategoryOption,
    ColourOption,
    ColourWeightOption,
    DecayOption,
    DiversityOption,
    ExcludeOption,
    JsonFlag,
    MaxPerOption,
    PriceMaxOption,
    PriceMinOption,
    WhereOption,
    _choosing,
    _run,
    _settings,
    user_errors,
)
from visrec.cli_output import duplicates_table, emit, err, hits_table, report_table
from visrec.errors import InvalidQuery


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
