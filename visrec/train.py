"""Fine-tuning, as the paper does it, and export.

Phase 1: backbone frozen, the new layers (head, and `fc` when the starting weights lack it) trained
with Adam on pooled features computed once. Phase 2: everything unfrozen, a small learning rate,
light augmentation. BatchNorm keeps its ImageNet statistics in both phases (eval mode): phase 1's
features were taken that way, and switching would throw away the warm start.
Top-1/top-3 are measured on a stratified held-out split. Serving never imports this module.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visrec.artefact import Manifest, save_artefact
from visrec.catalogue import Catalogue
from visrec.config import Settings
from visrec.errors import CatalogueError
from visrec.images import ImageDataset, ImageItem, ImageLimits, Preprocess, collate_images
from visrec.model import VisrecNet, WeightInfo, build_model, load_pretrained

log = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class TrainResult:
    model: VisrecNet
    classes: list[str]
    pretrained: WeightInfo
    metrics: dict[str, float]
    losses: dict[str, list[float]] = field(default_factory=dict)  # mean loss per epoch, by phase


def split_holdout(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of positions into (train, held-out); every class with ≥2 items is in both."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        by_class.setdefault(label, []).append(position)
    train, held_out = [], []
    for positions in by_class.values():
        rng.shuffle(positions)
        n_out = min(len(positions) - 1, max(1, round(len(positions) * fraction))) if len(positions) > 1 else 0
        held_out += positions[:n_out]
        train += positions[n_out:]
    return sorted(train), sorted(held_out)


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 3)
) -> dict[int, float]:
    """Share of rows whose target is among the k highest logits, for each k (capped at the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == targets.unsqueeze(1)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def train(
    catalogue: Catalogue, settings: Settings, device: torch.device, progress: StageProgress | None = None
) -> TrainResult:
    """Fine-tune on the catalogue's categorised products; returns the model and its held-out metrics."""
    cfg = settings.train
    torch.manual_seed(cfg.seed)
    labelled = [p for p in catalogue.products if p.category]
    classes = sorted({p.category for p in labelled if p.category})
    if len(classes) < 2:
        raise CatalogueError(f"training needs at least 2 categories; {catalogue.path} has {len(classes)}")
    labels = [classes.index(p.category or "") for p in labelled]
    refs = [catalogue.image_ref(p) for p in labelled]
    train_pos, test_pos = split_holdout(labels, cfg.holdout, cfg.seed)
    if not test_pos:
        raise CatalogueError("too few products per category to hold any out for evaluation")

    model = build_model(cfg.backbone, len(classes))
    pretrained = load_pretrained(model, cfg.backbone, cfg.weights)
    model.to(device)
    pre = Preprocess(input_size=cfg.image_size)
    limits = ImageLimits(settings.ingest.max_image_pixels, settings.ingest.max_image_bytes)
    workers = settings.embed.workers

    def loader(positions: list[int], hflip: float, shuffle: bool) -> DataLoader[ImageItem]:
        dataset = ImageDataset([refs[i] for i in positions], pre, limits, hflip_p=hflip)
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=collate_images,
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=device.type == "cuda",
        )

    train_targets = torch.tensor([labels[i] for i in train_pos])
    result = TrainResult(model, classes, pretrained, metrics={})
    started = time.perf_counter()
    if cfg.epochs_frozen:
        model.eval()  # phase 1's features: computed once, BatchNorm on its pretrained statistics
        feats, kept = _infer(model.pooled, loader(train_pos, 0.0, False), device, "features", progress)
        targets = train_targets[kept]
        result.losses["frozen"] = _train_frozen(
            model,
            feats,
            targets,
            pretrained,
            cfg.epochs_frozen,
            cfg.lr_frozen,
            cfg.batch_size,
            cfg.seed,
            progress,
        )
    result.metrics["seconds_frozen"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    if cfg.epochs_finetune:
        result.losses["finetune"] = _finetune(
            model,
            loader(train_pos, 0.5, True),
            train_targets,
            device,
            cfg.epochs_finetune,
            cfg.lr_finetune,
            progress,
        )
    result.metrics["seconds_finetune"] = round(time.perf_counter() - started, 1)

    test_targets = torch.tensor([labels[i] for i in test_pos])
    model.eval()
    logits, kept = _infer(model, loader(test_pos, 0.0, False), device, "evaluate", progress)
    accuracy = topk_accuracy(logits, test_targets[kept])
    result.metrics.update(
        top1=round(accuracy[1], 4),
        top3=round(accuracy[3], 4),
        train_images=len(train_pos),
        heldout_images=len(kept),
    )
    log.info("held-out top-1 %.3f, top-3 %.3f on %d images", accuracy[1], accuracy[3], len(kept))
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
        preprocess=Preprocess(input_size=cfg.image_size),
        metrics=result.metrics,
        training=cfg.model_dump(mode="json") | {"losses": result.losses},
    )


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _infer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader[ImageItem],
    device: torch.device,
    stage: str,
    progress: StageProgress | None,
) -> tuple[torch.Tensor, list[int]]:
    """`fn` over every image that decodes, in eval mode: the stacked outputs and their dataset indices."""
    outputs, kept = [], []
    with torch.inference_mode():
        for step, batch in enumerate(loader, 1):
            if batch.indices:
                outputs.append(fn(batch.pixels.to(device, non_blocking=True)).cpu())
                kept += batch.indices
            if progress:
                progress(stage, step, len(loader))
    if not outputs:
        raise CatalogueError(f"{stage}: no image could be decoded")
    return torch.cat(outputs), kept


def _train_frozen(
    model: VisrecNet,
    feats: torch.Tensor,
    targets: torch.Tensor,
    pretrained: WeightInfo,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: StageProgress | None,
) -> list[float]:
    fresh_fc = bool({"backbone", "backbone.fc"} & set(pretrained.trained_from_scratch))
    layers = nn.Sequential(model.backbone.fc, model.head) if fresh_fc else model.head
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layers.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    optimiser = torch.optim.Adam(layers.parameters(), lr=lr)
    data = DataLoader(
        TensorDataset(feats, targets),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    layers.train()
    losses = []
    for epoch in range(1, epochs + 1):
        total = 0.0
        for x, y in data:
            loss = nn.functional.cross_entropy(model.head(model.backbone.fc(x.to(device))), y.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
        losses.append(total / len(targets))
        log.info("phase 1 epoch %d/%d: loss %.4f", epoch, epochs, losses[-1])
        if progress:
            progress("frozen", epoch, epochs)
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def _finetune(
    model: VisrecNet,
    loader: DataLoader[ImageItem],
    targets: torch.Tensor,
    device: torch.device,
    epochs: int,
    lr: float,
    progress: StageProgress | None,
) -> list[float]:
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        _freeze_batchnorm(model)
        total, seen = 0.0, 0
        for step, batch in enumerate(loader, 1):
            if batch.indices:
                y = targets[batch.indices].to(device)
                loss = nn.functional.cross_entropy(model(batch.pixels.to(device, non_blocking=True)), y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total, seen = total + loss.item() * len(y), seen + len(y)
            if progress:
                progress(f"finetune {epoch}/{epochs}", step, len(loader))
        losses.append(total / max(seen, 1))
        log.info("phase 2 epoch %d/%d: loss %.4f", epoch, epochs, losses[-1])
    model.eval()
    return losses
