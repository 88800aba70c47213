"""What every `visrec` command shares: settings from flags, running a job, errors as one line, options."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.markup import escape

from visrec.cli_output import err, progress_bars
from visrec.config import Settings, load_settings
from visrec.errors import InvalidSetting, VisrecError
from visrec.jobs import Job

if TYPE_CHECKING:  # torch: imported by the commands that embed, not by every command
    import torch


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
