"""Fine-tuning, as the paper does it, and export.

Phase 1: backbone frozen, the new layers (head, and `fc` when the starting weights lack it) trained
with Adam on pooled features computed once (and cached in `work_dir`). Phase 2: everything unfrozen, a
small learning rate on a cosine schedule, flips and small crops. BatchNorm keeps its ImageNet
statistics in both phases (eval mode): phase 1's features were taken that way, and switching would
throw away the warm start.

A validation split carved from the training images picks the best epoch of each phase (phase 2 keeps
phase 1's model if it never beats it) and stops a phase early. The held-out split (a stratified share
of the catalogue, or a separate test catalogue) is evaluated once, after training. With `work_dir`
set, each phase checkpoints and a rerun with the same settings resumes. Serving never imports this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from visrec.artefact import HELDOUT_PRODUCTS, Manifest, save_artefact
from visrec.catalogue import Catalogue
from visrec.config import Settings
from visrec.errors import OutputUnwritable
from visrec.estimate import Estimate, estimate
from visrec.features import StageProgress, infer
from visrec.fs import folder_problem
from visrec.images import Preprocess
from visrec.metrics import topk_accuracy
from visrec.model import EMBEDDING_DIM, build_model, load_pretrained
from visrec.phases import HeldOut, Run, TrainResult, embed_and_classify, finetune_phase, frozen_phase
from visrec.splits import split_data

log = logging.getLogger(__name__)


def train(
    catalogue: Catalogue,
    settings: Settings,
    device: torch.device,
    progress: StageProgress | None = None,
    *,
    test: Catalogue | None = None,
    stop_at: float | None = None,
    announce: Callable[[Estimate], None] | None = None,
) -> TrainResult:
    """Fine-tune on the catalogue's categorised products; returns the model and its held-out metrics.

    `test`, if given, is the held-out split (evaluated once, after training) and all of `catalogue`
    trains. `stop_at`, a `time.monotonic()` instant, ends training early and cleanly: no phase-1 epoch
    and no phase-2 step starts after it (an epoch cut short is validated and may still be the best); the
    held-out evaluation runs all the same, so a caller with a deadline reserves its time.
    `metrics["stopped_at_deadline"]` is 1 when training was cut. `announce`, if given, is handed the
    run's time estimate (`visrec.estimate`) before training starts: measuring it costs a few batches.
    Raises `CatalogueError` (see `split_data`), `ModelError` (weights) or `OutputUnwritable` (the
    artefact's folder cannot be written: checked first).
    """
    problem = folder_problem(settings.artefact)  # said now, not after the training it would lose
    if problem:
        raise OutputUnwritable(
            f"cannot write the model to {settings.artefact}: {problem} (--out, VISREC_ARTEFACT)"
        )
    cfg = settings.train
    torch.manual_seed(cfg.seed)
    classes, fit, val, held_out = split_data(catalogue, cfg, test)
    model = build_model(cfg.backbone, len(classes), cfg.loss, cfg.temperature)
    pretrained = load_pretrained(model, cfg.backbone, cfg.weights)
    model.to(device)
    run = Run(cfg, settings, device, progress, fit, val, stop_at)
    result = TrainResult(model, classes, pretrained, metrics={})
    result.heldout_products = sorted(set(held_out.ids) - set(fit.ids) - set(val.ids))
    metrics = result.metrics
    metrics.update(train_images=len(fit.refs), validation_images=len(val.refs))
    if announce is not None and (guess := estimate(run, model, len(held_out.refs))) is not None:
        announce(guess)
    if cfg.epochs_frozen:
        frozen_phase(run, result)
    if cfg.epochs_finetune:
        started = time.perf_counter()
        finetune_phase(run, result)
        metrics["seconds_finetune"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    model.eval()
    evaluate = run.loader(run.images(held_out.refs))
    outputs, kept = infer(embed_and_classify(model), evaluate, device, "evaluate", progress)
    metrics["seconds_evaluate"] = round(time.perf_counter() - started, 1)
    targets = torch.tensor(held_out.labels)[kept]
    logits = outputs[:, EMBEDDING_DIM:]
    accuracy = topk_accuracy(logits, targets)
    result.heldout = HeldOut(held_out.refs, targets, logits, outputs[:, :EMBEDDING_DIM], kept)
    metrics.update(top1=round(accuracy[1], 4), top3=round(accuracy[3], 4), heldout_images=len(kept))
    log.info("held-out top-1 %.4f, top-3 %.4f on %d images", accuracy[1], accuracy[3], len(kept))
    return result


def export(result: TrainResult, settings: Settings) -> Manifest:
    """Save the trained model as the artefact at `settings.artefact`."""
    cfg = settings.train
    return save_artefact(
        result.model,
        settings.artefact,
        backbone=cfg.backbone,
        pretrained=result.pretrained,
        classes=result.classes,
        loss=cfg.loss,
        preprocess=Preprocess(input_size=cfg.image_size),
        metrics=result.metrics,
        training=cfg.model_dump(mode="json")
        | {
            "losses": result.losses,
            "validation": result.validation,
            HELDOUT_PRODUCTS: result.heldout_products,
        },
    )
