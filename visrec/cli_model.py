"""`visrec train`: fine-tune the embedder on a catalogue and export it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from visrec.catalogue import read_catalogue
from visrec.cli_common import JsonFlag, _device, _settings, user_errors
from visrec.cli_output import emit, err, progress_bars, trained_table

if TYPE_CHECKING:
    from visrec.estimate import Estimate


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
