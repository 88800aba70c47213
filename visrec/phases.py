"""The two training phases of `visrec.train`, and what they share (`Run`: data, loaders, checkpoints;
`TrainResult`: the model and the figures each phase adds to it).

Phase 1 (`frozen_phase`) trains the new layers with Adam on pooled features computed once; phase 2
(`finetune_phase`) unfreezes everything, with a small learning rate on a cosine schedule. Both keep
BatchNorm in eval mode, pick their best epoch on the validation split and stop early.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from visrec.config import Settings, TrainSettings
from visrec.features import StageProgress, atomic_save, image_loader, infer, pooled_features
from visrec.images import AugmentedImages, ImageDataset, ImageItem, ImageLimits, Preprocess
from visrec.metrics import topk_accuracy
from visrec.model import VisrecNet, WeightInfo
from visrec.splits import Split

log = logging.getLogger(__name__)


# Settings that change what phase 1 produces; the others (phase 2's) leave its checkpoint valid.
PHASE1_FIELDS = (
    "backbone",
    "weights",
    "image_size",
    "epochs_frozen",
    "lr_frozen",
    "batch_size",
    "holdout",
    "seed",
    "validation",
    "patience",
    "loss",
    "temperature",
)


@dataclass
class HeldOut:
    """The one evaluation of the held-out split: for each image that decoded, its target, logits and
    1000-d embedding, and its position in the held-out split."""

    refs: list[str]
    targets: torch.Tensor
    logits: torch.Tensor
    embeddings: torch.Tensor
    positions: list[int]


@dataclass
class TrainResult:
    """What `visrec.train.train` returns; each phase adds its losses, validation history and figures."""

    model: VisrecNet
    classes: list[str]
    pretrained: WeightInfo
    metrics: dict[str, float]
    losses: dict[str, list[float]] = field(default_factory=dict)  # mean loss per epoch, by phase
    validation: dict[str, list[float]] = field(default_factory=dict)  # validation top-1 per epoch
    heldout: HeldOut | None = None
    # Ids of the held-out products the model never saw in training or validation: the manifest records
    # them so that `visrec reindex`'s quality gate can query products neither model was trained on.
    heldout_products: list[str] = field(default_factory=list)


class Run:
    """What both phases share: settings, data, loaders and the work folder's checkpoints."""

    def __init__(
        self,
        cfg: TrainSettings,
        settings: Settings,
        device: torch.device,
        progress: StageProgress | None,
        fit: Split,
        val: Split,
        stop_at: float | None = None,
    ) -> None:
        self.cfg, self.device, self.progress, self.fit, self.val = cfg, device, progress, fit, val
        self.stop_at = stop_at  # a time.monotonic() instant: no epoch or step starts after it
        self.pre = Preprocess(input_size=cfg.image_size)
        self.limits = ImageLimits.from_settings(settings.ingest)
        self.workers = settings.embed.workers
        data = [fit.refs, fit.labels, val.refs, val.labels]
        phase1 = {k: v for k, v in cfg.model_dump(mode="json").items() if k in PHASE1_FIELDS}
        phase2 = cfg.model_dump(mode="json", exclude={"work_dir"})
        finetune = _digest([phase2, data])
        self.keys = {"frozen": _digest([phase1, data]), "finetune": finetune, "best": finetune}

    def out_of_time(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at

    def images(self, refs: Sequence[str]) -> ImageDataset:
        return ImageDataset(refs, self.pre, self.limits)

    def loader(self, dataset: ImageDataset, **kw: Any) -> DataLoader[ImageItem]:
        return image_loader(dataset, self.cfg.batch_size, self.workers, self.device, **kw)

    def path(self, name: str) -> Path | None:
        return self.cfg.work_dir / f"{name}.pt" if self.cfg.work_dir else None

    def load(self, phase: str) -> dict[str, Any] | None:
        """The phase's checkpoint if there is one from these very settings and data."""
        path = self.path(phase)
        if path is None or not path.is_file():
            return None
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") != self.keys[phase]:
            log.warning("%s was written with other settings or data: starting %s afresh", path, phase)
            return None
        log.info("resuming %s from %s", phase, path)
        return state

    def save(self, phase: str, state: dict[str, Any]) -> None:
        path = self.path(phase)
        if path is not None:
            atomic_save({"key": self.keys[phase]} | state, path)


def frozen_phase(run: Run, result: TrainResult) -> None:
    model, cfg, metrics = result.model, run.cfg, result.metrics
    saved = run.load("frozen")
    if saved is None:
        started = time.perf_counter()
        feats, kept = pooled_features(
            model,
            run.fit.refs + run.val.refs,
            run.pre,
            run.device,
            batch_size=cfg.batch_size,
            workers=run.workers,
            limits=run.limits,
            cache_dir=cfg.work_dir,
            progress=run.progress,
        )
        seconds = time.perf_counter() - started
        timing = {
            "seconds_features": round(seconds, 1),
            "features_images_per_s": round(len(kept) / seconds, 1),
        }
        labels = torch.tensor(run.fit.labels + run.val.labels)[kept]
        is_val = torch.tensor(kept) >= len(run.fit.refs)
        started = time.perf_counter()
        losses, val_top1, cut = _train_frozen(
            model,
            (feats[~is_val], labels[~is_val]),
            (feats[is_val], labels[is_val]),
            result.pretrained,
            cfg,
            run,
        )
        timing["seconds_frozen"] = round(time.perf_counter() - started, 1)
        saved = {"model": model.state_dict(), "losses": losses, "validation": val_top1, "timing": timing}
        if cut:
            metrics["stopped_at_deadline"] = 1  # not checkpointed: a rerun trains phase 1 in full
        else:
            run.save("frozen", saved)
    else:
        model.load_state_dict(saved["model"])
    result.losses["frozen"], result.validation["frozen"] = saved["losses"], saved["validation"]
    metrics.update(saved["timing"])  # a resumed run reports the time phase 1 took when it ran
    if saved["validation"]:
        metrics["val_top1_frozen"] = round(max(saved["validation"]), 4)


def _train_frozen(
    model: VisrecNet,
    fit: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    pretrained: WeightInfo,
    cfg: TrainSettings,
    run: Run,
) -> tuple[list[float], list[float], bool]:
    """Phase 1 on cached features: (loss, validation top-1) per epoch and whether `run.stop_at` cut it
    short (no epoch starts after it; the first always runs); the best epoch's layers are kept."""
    fresh_fc = bool({"backbone", "backbone.fc"} & set(pretrained.trained_from_scratch))
    layers = nn.Sequential(model.backbone.fc, model.head) if fresh_fc else model.head
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layers.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    optimiser = torch.optim.Adam(layers.parameters(), lr=cfg.lr_frozen)
    data = DataLoader(
        TensorDataset(*fit),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    stopper = _EarlyStop(cfg.patience)
    losses: list[float] = []
    cut = False
    for epoch in range(1, cfg.epochs_frozen + 1):
        layers.train()
        total = 0.0
        for x, y in data:
            loss = nn.functional.cross_entropy(model.head(model.backbone.fc(x.to(device))), y.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
        losses.append(total / len(fit[1]))
        layers.eval()
        with torch.inference_mode():
            top1 = _top1(model.head(model.backbone.fc(val[0].to(device))).cpu(), val[1])
        log.info(
            "phase 1 epoch %d/%d: loss %.4f, validation top-1 %s", epoch, cfg.epochs_frozen, losses[-1], top1
        )
        if run.progress:
            run.progress("frozen", epoch, cfg.epochs_frozen)
        if stopper.update(epoch, top1, layers):
            break
        if epoch < cfg.epochs_frozen and run.out_of_time():
            cut = True
            break
    stopper.restore(layers)
    for p in model.parameters():
        p.requires_grad_(True)
    return losses, stopper.history, cut


class _EarlyStop:
    """Tracks validation top-1 per epoch, keeps the best epoch's weights, says when to stop."""

    def __init__(self, patience: int, best: float = -1.0, best_epoch: int = 0) -> None:
        self.patience, self.best, self.best_epoch = patience, best, best_epoch
        self.history: list[float] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, top1: float | None, module: nn.Module) -> bool:
        """Record an epoch; True when it is time to stop. Without validation the last epoch is kept."""
        if top1 is None:
            self.best_epoch = epoch
            return False
        self.history.append(top1)
        if top1 > self.best:
            self.best, self.best_epoch = top1, epoch
            self.best_state = copy.deepcopy(module.state_dict())
            return False
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def restore(self, module: nn.Module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


def finetune_phase(run: Run, result: TrainResult) -> None:
    model, cfg = result.model, run.cfg
    dataset = AugmentedImages(run.fit.refs, run.pre, run.limits, cfg.hflip, cfg.crop_scale)
    per_epoch = min(cfg.finetune_images or len(dataset), len(dataset))
    batches = math.ceil(per_epoch / cfg.batch_size)  # a phase-2 epoch's steps
    steps = batches * cfg.epochs_finetune
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr_finetune)
    # Cosine to 1 % of the starting rate over all of phase 2's steps: late steps refine, not wander.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (
            1.0 if cfg.lr_schedule == "constant" else 0.01 + 0.495 * (1 + math.cos(math.pi * step / steps))
        ),
    )
    frozen_best = max(result.validation.get("frozen", []), default=-1.0)
    stopper = _EarlyStop(cfg.patience, best=frozen_best)  # epoch 0, phase 1's model, is the one to beat
    stopper.best_state = copy.deepcopy(model.state_dict()) if run.val.refs else None
    targets = torch.tensor(run.fit.labels)
    losses: list[float] = []
    start, done = 1, False
    saved = run.load("finetune")
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
        best = run.load("best")
        stopper.best, stopper.best_epoch, stopper.history = (
            saved["best"],
            saved["best_epoch"],
            saved["validation"],
        )
        stopper.best_state = best["model"] if best is not None else stopper.best_state
        losses, start, done = saved["losses"], saved["epoch"] + 1, saved["done"]
    # Training throughput, summed over runs when resumed: images and seconds spent in training steps.
    images, seconds = (saved["images"], saved["seconds"]) if saved else (0, 0.0)
    for epoch in range(start, cfg.epochs_finetune + 1):
        if done:
            break
        if run.out_of_time():
            result.metrics["stopped_at_deadline"] = 1
            break
        torch.manual_seed(cfg.seed + epoch)  # augmentation draws, when the loader has no workers
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        loader = run.loader(
            dataset, sampler=RandomSampler(dataset, num_samples=per_epoch, generator=generator)
        )
        started = time.perf_counter()
        loss, seen, cut = _finetune_epoch(
            model, loader, targets, optimiser, scheduler, run, ((epoch - 1) * batches, steps)
        )
        losses.append(loss)
        images, seconds = images + seen, seconds + time.perf_counter() - started
        top1 = _validate(model, run) if run.val.refs else None
        log.info(
            "phase 2 epoch %d/%d%s: loss %.4f, validation top-1 %s",
            epoch,
            cfg.epochs_finetune,
            f" (cut at the deadline after {seen} images)" if cut else "",
            loss,
            top1,
        )
        # A cut epoch counts as run: a rerun of these settings resumes at the next one.
        done = stopper.update(epoch, top1, model) or epoch == cfg.epochs_finetune
        if stopper.best_epoch == epoch:
            run.save("best", {"model": model.state_dict(), "epoch": epoch})
        run.save(
            "finetune",
            {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "done": done,
                "losses": losses,
                "validation": stopper.history,
                "best": stopper.best,
                "best_epoch": stopper.best_epoch,
                "images": images,
                "seconds": seconds,
            },
        )
        if cut:
            result.metrics["stopped_at_deadline"] = 1
            break
    stopper.restore(model)
    model.eval()
    result.losses["finetune"], result.validation["finetune"] = losses, stopper.history
    result.metrics["best_epoch_finetune"] = stopper.best_epoch
    if images:
        result.metrics["finetune_images_per_s"] = round(images / seconds, 1)


def _finetune_epoch(
    model: VisrecNet,
    loader: DataLoader[ImageItem],
    targets: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run: Run,
    steps: tuple[int, int],
) -> tuple[float, int, bool]:
    """One pass of phase 2: (mean loss, images seen, whether `run.stop_at` cut it short). `steps`: the
    phase's steps before this epoch, and in all; progress counts the whole phase's steps (a bar per
    epoch said nothing of how much of the phase was left)."""
    model.train()
    freeze_batchnorm(model)
    total, seen = 0.0, 0
    for step, batch in enumerate(loader, 1):
        if batch.indices:
            y = targets[batch.indices].to(run.device)
            loss = nn.functional.cross_entropy(model(batch.pixels.to(run.device, non_blocking=True)), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        if run.progress:
            run.progress("finetune", steps[0] + step, steps[1])
        if run.out_of_time() and step < len(loader):
            model.eval()
            return total / max(seen, 1), seen, True
    model.eval()
    return total / max(seen, 1), seen, False


def _validate(model: VisrecNet, run: Run) -> float | None:
    logits, kept = infer(model, run.loader(run.images(run.val.refs)), run.device, "validate", run.progress)
    return _top1(logits, torch.tensor(run.val.labels)[kept])


def _top1(logits: torch.Tensor, targets: torch.Tensor) -> float | None:
    return round(topk_accuracy(logits, targets, ks=(1,))[1], 4) if len(targets) else None


def embed_and_classify(model: VisrecNet) -> Callable[[torch.Tensor], torch.Tensor]:
    def both(x: torch.Tensor) -> torch.Tensor:
        embedding = model.embed(x)
        return torch.cat([embedding, model.head(embedding)], dim=1)

    return both


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
